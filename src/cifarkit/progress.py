"""Progress output: a tqdm bar on a terminal, a few plain lines otherwise (CI logs, pipes)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, file=None,
                 plain_every_s: float = 10.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file or sys.stderr
        self.enabled = enabled
        self.n = 0
        self.t0 = self.last = time.perf_counter()
        self.plain_every_s = plain_every_s
        self.postfix = ""
        self.bar = None
        if enabled and _in_notebook():   # Jupyter: tqdm's notebook widget (a text bar without ipywidgets)
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, unit_scale=(unit == "img"))
        elif enabled and getattr(self.file, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.file, leave=False,
                            dynamic_ncols=True, unit_scale=(unit == "img"))

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled:
            now = time.perf_counter()
            if now - self.last >= self.plain_every_s and self.n < self.total:
                self.last = now
                rate = self.n / max(now - self.t0, 1e-9)
                eta = (self.total - self.n) / max(rate, 1e-9)
                # under one a second (a CPU step of 2,000 images), seconds each: not "0 step/s"
                speed = f"{rate:,.0f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{self.unit}"
                print(f"  {self.desc}: {self.n}/{self.total} {self.unit} {speed} "
                      f"eta {eta:.0f}s {self.postfix}".rstrip(), file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (an IPython shell that is not a terminal one)."""
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell is not None else None
    except Exception:  # noqa: BLE001
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"
