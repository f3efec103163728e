"""CLI command group `vtoolkit train ...`: train the small learned parts some methods need (the model stays frozen)."""
from __future__ import annotations

from pathlib import Path

import typer

train_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Train the small learned parts some methods need, with the model frozen.")


@train_app.command("dyvte")
def dyvte(model: str = typer.Option(..., "--model", help="checkpoint path / hub id, or tiny:llava|llava_next|qwen2_vl|"
                                                          "qwen2_5_vl"),
          data: Path = typer.Option(..., "--data", help="LLaVA conversation JSON (single-turn, one image each)"),
          images: Path = typer.Option(..., "--images", help="folder the 'image' fields are relative to"),
          out: Path = typer.Option(..., "--out", help="output folder: routers.safetensors, logs, checkpoints"),
          router_hidden: int = typer.Option(2048, min=1, help="router hidden size (official 2048)"),
          batch_size: int = typer.Option(16, min=1, help="samples per process and step (official 16 per GPU)"),
          epochs: float = typer.Option(1.0, help="passes over the data (official 1)"),
          max_steps: int = typer.Option(0, min=0, help="stop after this many steps (0: from --epochs)"),
          lr: float = typer.Option(6e-5, help="AdamW learning rate (official 6e-5, cosine schedule)"),
          warmup_ratio: float = typer.Option(0.03, help="share of the steps spent warming up (official 0.03)"),
          save_every: int = typer.Option(500, min=0, help="checkpoint every N steps (0: none)"),
          resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in --out"),
          overwrite: bool = typer.Option(False, "--overwrite", help="delete the results of an earlier run in --out "
                                                                    "first"),
          seed: int = typer.Option(0), dtype: str = typer.Option("auto", help="auto|float16|bfloat16|float32"),
          max_length: int = typer.Option(2048, min=2, help="tokens per sample (prompt + answer), official 2048"),
          agree: float = typer.Option(0.99, help="label exit iff greedy agreement on the answer > this ..."),
          nll_ratio: float = typer.Option(1.03, help="... and NLL(image keys masked) < this x NLL(full)"),
          progress: bool = typer.Option(True, "--progress/--no-progress")) -> None:
    """Train DyVTE exit routers (one per LLM layer; the LLM frozen) with the official labelling rule.

    An --out holding an earlier run's results is refused unless --resume (continue from its last checkpoint) or
    --overwrite (delete them first), as in `vtoolkit eval`.

    Data parallel: `accelerate launch --multi_gpu --num_processes N -m vtoolkit train dyvte ...` (or
    `torchrun --nproc_per_node N -m vtoolkit ...`). Then `vt.apply_method(model, "dyvte", routers=OUT)`.
    """
    from vtoolkit.train.dyvte import TrainConfig, train

    cfg = TrainConfig(model=model, data=str(data), images=str(images), out=str(out), router_hidden=router_hidden,
                      batch_size=batch_size, epochs=epochs, max_steps=max_steps, lr=lr, warmup_ratio=warmup_ratio,
                      save_every=save_every, resume=resume, overwrite=overwrite, seed=seed, dtype=dtype,
                      max_length=max_length, agree=agree, nll_ratio=nll_ratio, progress=progress)
    result = train(cfg)     # a wrong setting or file: one `error:` line, exit 2 (vtoolkit/cli.py RootGroup)
    if result.main_process:
        typer.echo(f"trained {result.steps} steps; routers: {result.routers_path}")


def register(app: typer.Typer) -> None:
    """Mount `vtoolkit train` on the main app."""
    app.add_typer(train_app, name="train")
