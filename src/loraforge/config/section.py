"""The base of every config section: unknown keys are errors and a loaded config cannot change."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
