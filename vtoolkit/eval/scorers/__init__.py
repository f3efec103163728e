"""Pure-Python scorers for POPE, CHAIR and MME that reproduce the original scripts' numbers exactly.

No model, torch or network imports. ``nltk`` (extra ``chair``) is imported lazily, only when a CHAIR evaluator is
built. See each module's docstring for the rules/variants, formulas and deviations.
"""
from vtoolkit.eval.scorers.chair import (
                                         CHAIR,
                                         CHAIR_VARIANTS,
                                         ChairResourceError,
                                         ChairResult,
                                         build_gt_from_coco,
                                         load_captions,
                                         load_gt,
                                         score_chair,
                                         score_chair_files,
                                         singularize,
)
from vtoolkit.eval.scorers.mme import (
                                         COGNITION_TASKS,
                                         MME_RULES,
                                         PERCEPTION_TASKS,
                                         MMEResult,
                                         parse_mme_answer,
                                         read_mme_results_dir,
                                         score_mme,
                                         score_mme_dir,
)
from vtoolkit.eval.scorers.pope import (
                                         POPE_RULES,
                                         PopeReport,
                                         PopeResult,
                                         load_pope_answers,
                                         load_pope_labels,
                                         load_pope_questions,
                                         parse_pope_answer,
                                         score_pope,
                                         score_pope_files,
                                         score_pope_splits,
)

__all__ = [
                                         "CHAIR",
                                         "CHAIR_VARIANTS",
                                         "COGNITION_TASKS",
                                         "MME_RULES",
                                         "PERCEPTION_TASKS",
                                         "POPE_RULES",
                                         "ChairResourceError",
                                         "ChairResult",
                                         "MMEResult",
                                         "PopeReport",
                                         "PopeResult",
                                         "build_gt_from_coco",
                                         "load_captions",
                                         "load_gt",
                                         "load_pope_answers",
                                         "load_pope_labels",
                                         "load_pope_questions",
                                         "parse_mme_answer",
                                         "parse_pope_answer",
                                         "read_mme_results_dir",
                                         "score_chair",
                                         "score_chair_files",
                                         "score_mme",
                                         "score_mme_dir",
                                         "score_pope",
                                         "score_pope_files",
                                         "score_pope_splits",
                                         "singularize",
]
