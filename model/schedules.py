"""Learning-rate schedules as pure functions of the update step."""

from __future__ import annotations

from dataclasses import dataclass

from model.errors import SettingError, UsageError


@dataclass(frozen=True)
class Constant:
    """The same eta at every step."""

    eta: float

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise SettingError(f"eta must be > 0, got eta={self.eta!r}", field="eta")

    def lr_at(self, step: int) -> float:
        return self.eta


@dataclass(frozen=True)
class StepDecay:
    """eta * decay ** epoch: multiplied by ``decay`` after every epoch."""

    eta: float
    decay: float
    steps_per_epoch: int

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise SettingError(f"eta must be > 0, got eta={self.eta!r}", field="eta")
        if not 0 < self.decay <= 1:
            raise SettingError(f"decay must be in (0, 1], got decay={self.decay!r}", field="decay")
        if self.steps_per_epoch < 1:
            raise UsageError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch!r}")

    def lr_at(self, step: int) -> float:
        return self.eta * self.decay ** (step // self.steps_per_epoch)


@dataclass(frozen=True)
class Cyclical:
    """Triangular cyclical learning rate (Smith 2015, DD2424).

    Rises linearly from eta_min to eta_max over ``n_s`` steps, falls back over
    the next ``n_s``; one cycle is 2 * n_s update steps.
    """

    eta_min: float
    eta_max: float
    n_s: int

    def __post_init__(self) -> None:
        if not self.eta_min > 0:
            raise SettingError(
                f"eta_min must be > 0, got eta_min={self.eta_min!r}", field="eta_min"
            )
        if not self.eta_max > self.eta_min:
            raise UsageError(
                f"eta_max must be > eta_min, "
                f"got eta_min={self.eta_min!r}, eta_max={self.eta_max!r}"
            )
        if self.n_s < 1:
            raise SettingError(f"n_s must be >= 1, got n_s={self.n_s!r}", field="n_s")

    def lr_at(self, step: int) -> float:
        t = step % (2 * self.n_s)
        frac = t / self.n_s if t < self.n_s else 2.0 - t / self.n_s
        return self.eta_min + frac * (self.eta_max - self.eta_min)
