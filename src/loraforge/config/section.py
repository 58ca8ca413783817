"""The base of every config section: unknown keys are errors, true/false is no number, a number is finite and a
whole number fits in 64 bits, a value of a key that takes several types is one error, and a loaded config cannot
change."""

import types
import typing

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator
from pydantic_core import PydanticCustomError

# JSON schema types in words: (one, a list of them).
KINDS = {"integer": ("a whole number", "whole numbers"), "number": ("a number", "numbers"), "string": ("text", "text"),
         "boolean": ("true or false", "true or false values"), "null": ("null", "nulls"),
         "array": ("a list", "lists"), "object": ("a mapping", "mappings")}
BOUNDS = {"minimum": "{} or more", "exclusiveMinimum": "above {}", "maximum": "{} or less", "exclusiveMaximum": "below {}"}


def _admits_bool(annotation) -> bool:
    return annotation is bool or any(_admits_bool(arg) for arg in typing.get_args(annotation))


def _is_union(annotation) -> bool:
    return (typing.get_origin(annotation) in (typing.Union, types.UnionType)
            and len([arg for arg in typing.get_args(annotation) if arg is not type(None)]) > 1)


def accepted(schema: dict, plural: bool = False) -> str:
    """What a JSON schema accepts, in words: 'a whole number (1 or more), epoch or null'."""
    if "anyOf" in schema:
        forms = [accepted(form, plural) for form in schema["anyOf"]]
        return f"{', '.join(forms[:-1])} or {forms[-1]}"
    if "const" in schema or "enum" in schema:
        return " or ".join(str(value) for value in schema.get("enum", [schema.get("const")]))
    kind = KINDS.get(schema.get("type"), ("a value", "values"))[plural]
    if schema.get("type") == "array" and "items" in schema:
        kind = f"{kind} of {accepted(schema['items'], plural=True)}"
    bounds = [text.format(schema[name]) for name, text in BOUNDS.items() if name in schema]
    return f"{kind} ({', '.join(bounds)})" if bounds else kind


# The largest whole number torch, numpy and the trainers hold; a larger one overflows where it is used.
LARGEST_INTEGER = 2**63 - 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _fits_in_64_bits(cls, value):
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(number, int) and not isinstance(number, bool) and abs(number) > LARGEST_INTEGER:
                raise ValueError(f"past the largest whole number a run can use ({LARGEST_INTEGER})")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _true_false_is_no_number(cls, value, info):
        """pydantic takes true as 1 for a number; YAML reads yes, no, on and off as true and false."""
        if isinstance(value, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("this key takes no true/false (YAML reads yes, no, on and off as true and false; "
                             "quote them to mean the text)")
        return value

    @field_validator("*", mode="wrap")
    @classmethod
    def _one_error_per_value(cls, value, handler, info):
        """pydantic reports a value that fits no type of a union once per type; one error says what the key takes."""
        try:
            return handler(value)
        except ValidationError as exc:
            annotation = cls.model_fields[info.field_name].annotation
            if exc.error_count() < 2 or not _is_union(annotation):
                raise
            raise PydanticCustomError("union_type", "give {accepted}",
                                      {"accepted": accepted(TypeAdapter(annotation).json_schema())}) from None
