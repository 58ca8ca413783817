"""The base of every config section: unknown keys are errors, true/false is no number, and a loaded config cannot
change."""

import typing

from pydantic import BaseModel, ConfigDict, field_validator


def _admits_bool(annotation) -> bool:
    return annotation is bool or any(_admits_bool(arg) for arg in typing.get_args(annotation))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _true_false_is_no_number(cls, value, info):
        """pydantic takes true as 1 for a number; YAML reads yes, no, on and off as true and false."""
        if isinstance(value, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("this key takes no true/false (YAML reads yes, no, on and off as true and false; "
                             "quote them to mean the text)")
        return value
