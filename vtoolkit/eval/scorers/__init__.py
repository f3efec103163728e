"""Pure-Python scorers for POPE, CHAIR and MME that reproduce the original scripts' numbers exactly.

No model, torch or network imports. ``nltk`` (extra ``chair``) is imported lazily, only by the CHAIR scorer.
"""
from vtoolkit.eval.scorers.mme import (COGNITION_TASKS, MME_RULES, PERCEPTION_TASKS, MMEResult, parse_mme_answer,
                                       read_mme_results_dir, score_mme, score_mme_dir)
from vtoolkit.eval.scorers.pope import (POPE_RULES, PopeReport, PopeResult, load_pope_answers, load_pope_labels,
                                        load_pope_questions, parse_pope_answer, score_pope, score_pope_files,
                                        score_pope_splits)

__all__ = [
    "POPE_RULES", "PopeResult", "PopeReport", "parse_pope_answer", "score_pope", "score_pope_splits",
    "score_pope_files", "load_pope_questions", "load_pope_labels", "load_pope_answers",
    "MME_RULES", "PERCEPTION_TASKS", "COGNITION_TASKS", "MMEResult", "parse_mme_answer", "read_mme_results_dir",
    "score_mme", "score_mme_dir",
]
