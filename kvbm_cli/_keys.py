"""The typed base of a scenario file's blocks (Typer-free: the engine spec and the workload configs share it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Keys(BaseModel):
    """A typed block of a scenario file: keys spelled as the flags (kebab-case), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", alias_generator=lambda name: name.replace("_", "-"),
                              populate_by_name=True)

    def validate(self) -> None:
        """Checks across keys (one CliError); a key's own bounds are in its Field."""
