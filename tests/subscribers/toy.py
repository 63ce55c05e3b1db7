"""A small real training loop that offers what ``trainbus.subscribers.TrainerLike`` asks of a
trainer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from trainbus.bus import CallbackRegistry, ControlChannel, EventType, event_type_for


def _reraise(event_type: EventType, callback: object, error: Exception) -> None:
    raise error


class ToyTrainer:
    """Linear regression on fixed random data, with Adam, inline callbacks and statefuls."""

    def __init__(self, job_id: str = "job-1", *, seed: int = 0, width: int = 8) -> None:
        torch.manual_seed(seed)
        self.job_id = job_id
        self.epoch = 0
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 1))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.control = ControlChannel(job_id)
        self.save_reason: str | None = None
        self.weights_origin: dict[str, Any] | None = None
        self.callbacks = CallbackRegistry(on_error=_reraise)
        self.statefuls: dict[str, Any] = {}
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(64, width, generator=generator)
        self.targets = self.inputs.sum(dim=1, keepdim=True)

    def add_callback(self, name: str, fn: Callable[[Any], object]) -> None:
        self.callbacks.add_callback(name, fn)

    def run_callbacks(self, name: str) -> None:
        self.callbacks.run_callbacks(event_type_for(name), self)

    def flush_events(self) -> None:
        pass  # publishes no batch events

    def register_stateful(self, name: str, obj: Any) -> None:
        self.statefuls[name] = obj

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "controllers": {name: obj.state_dict() for name, obj in self.statefuls.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, obj in self.statefuls.items():
            if name in state.get("controllers", {}):
                obj.load_state_dict(state["controllers"][name])

    def train_step(self) -> float:
        loss = torch.nn.functional.mse_loss(self.model(self.inputs), self.targets)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.metrics["train_loss"] = loss.item()
        self.run_callbacks("on_train_batch_end")
        return loss.item()

    def save(self, reason: str) -> None:
        self.save_reason = reason
        try:
            self.run_callbacks("on_model_save")
        finally:
            self.save_reason = None

    def end_epoch(self, metrics: Mapping[str, float] | None = None) -> None:
        """Finish ``self.epoch``: set metrics, fit_epoch_end callbacks, save, next epoch."""
        self.metrics.update(metrics or {"val_loss": self.metrics.get("train_loss", 0.0)})
        self.metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.run_callbacks(EventType.FIT_EPOCH_END.callback_name or "")
        self.save("epoch_end")
        self.epoch += 1
