"""tqdm bars for the long client-side operations (PLOT builds, training), shared by the CLI and the demo."""
from __future__ import annotations

from typing import IO

from tqdm import tqdm


class BuildBars:
    """One bar per build stage, driven by the store's streamed BuildDomainProgress messages."""

    def __init__(self, file: IO, prefix: str = "") -> None:
        self.file = file
        self.prefix = prefix
        self.bars: dict[str, tqdm] = {}

    def __call__(self, update) -> None:
        if update.stage == "done":
            return
        bar = self.bars.get(update.stage)
        if bar is None:
            bar = self.bars[update.stage] = tqdm(total=update.total, desc=f"{self.prefix}{update.stage}",
                                                 file=self.file)
        bar.total, bar.n = update.total, update.done
        if update.loss:
            bar.set_postfix(loss=f"{update.loss:.3f}", refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class TrainBar:
    """Steps and the latest loss of `hmi tenant train`."""

    def __init__(self, file: IO, desc: str = "training") -> None:
        self.bar = tqdm(desc=desc, unit="step", file=file)

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.bar.total, self.bar.n = total, step
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
