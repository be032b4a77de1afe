"""Dataset filters: which gold stars a dataset version (or a fine-tuning job's training file) holds. One shape for
the Dagster launchpad (``gold_star_dataset``'s config), the API (a fine-tuning job's ``dataset_filter``) and the
record a version keeps of what it was built from."""

from __future__ import annotations

from typing import Any

from dagster import Config
from pydantic import ConfigDict, Field

from vbatch_pipelines.errors import VbatchError


class FilterNotApplicable(VbatchError):
    code = "invalid_dataset_filter"


class DatasetFilter(Config):
    """Every field given must match (none given: every example)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field would otherwise filter nothing, silently

    schema_name: str | None = Field(default=None, max_length=64, description="one task schema, e.g. cv_parsing")
    model: str | None = Field(default=None, max_length=256, description="the model that answered")
    batch_metadata: dict[str, str] = Field(default_factory=dict, description="the batch's metadata has each of "
                                           "these key/value pairs")
    reviewer: str | None = Field(default=None, max_length=256, description="reviewed (among others) by this "
                                 "reviewer (their Label Studio email)")
    min_rating: int | None = Field(default=None, ge=1, le=5, description="rated at least this")
    min_agreement: float | None = Field(default=None, ge=0, le=1, description="at least this share of its reviewers "
                                        "on the majority's side (a task one reviewer reviewed has none: left out)")

    def given(self) -> dict[str, Any]:
        """The fields set (what a version records); empty: no filter."""
        return {key: value for key, value in self.model_dump().items() if value not in (None, {})}

    def matches(self, example: dict[str, Any]) -> bool:
        """Whether a dataset example (a row of a version's table) passes. A version built before a field was
        recorded cannot be filtered on it: FilterNotApplicable names it."""
        for key in self.given():
            if key not in _NEEDS or _NEEDS[key] not in example:
                raise FilterNotApplicable(f"This dataset version does not record what dataset_filter.{key} needs; "
                                          "build a new version and filter that", f"dataset_filter.{key}")
        if self.schema_name is not None and example["schema"] != self.schema_name:
            return False
        if self.model is not None and example["model"] != self.model:
            return False
        if any(example["batch_metadata"].get(k) != v for k, v in self.batch_metadata.items()):
            return False
        if self.reviewer is not None and self.reviewer not in example["reviewers"]:
            return False
        if self.min_rating is not None and (example["rating"] is None or example["rating"] < self.min_rating):
            return False
        return self.min_agreement is None or (example["agreement"] is not None
                                              and example["agreement"] >= self.min_agreement)


_NEEDS = {"schema_name": "schema", "model": "model", "batch_metadata": "batch_metadata", "reviewer": "reviewers",
          "min_rating": "rating", "min_agreement": "agreement"}
