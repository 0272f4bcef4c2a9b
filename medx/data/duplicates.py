"""Exact duplicates across splits: the same pixels in train and in test.

Public data sets hold one image under several names (the Kermany train and test splits share
30 groups of byte-identical files, one group under two patient ids), and a split by patient
cannot see that: a test image the model trained on inflates the test score. The digests of the
decoded pixels are compared, not those of the bytes, so a copy re-encoded with the same pixels
(PNG to BMP, other metadata) matches too. The digests come from the decode pass that verifies
the images (medx.data.io.pixel_digest), so the check costs no second decode.

``data.duplicates`` says what to do with a pixel group that spans splits:
- ``warn`` (default): log the groups and count them in the run's params;
- ``error``: refuse to run, naming a few pairs;
- ``drop``: remove every copy in a later split (order train, val, test), keeping the earliest.
  Training is unchanged, and val and test then hold only images that no earlier split holds.
Copies within one split are no leak; they are counted but never dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from medx.data.splits import SPLITS
from medx.errors import ConfigError, DataError

log = logging.getLogger(__name__)

POLICIES = ("warn", "error", "drop")
_SHOWN = 5  # duplicate pairs named in a message


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ConfigError(
            f"data.duplicates={policy!r} is not one of {', '.join(POLICIES)} (what to do with "
            "images whose pixels appear in two splits)."
        )
    return policy


@dataclass
class Duplicates:
    """What the check found: the later-split copies, and what was done about them."""

    policy: str
    groups: int = 0  # pixel groups spanning two or more splits
    within_split: int = 0  # groups inside one split only (no leak)
    later: dict[str, list[int]] = field(default_factory=dict)  # split -> positions of copies
    pairs: list[str] = field(default_factory=list)  # "test/a.png = train/b.png", a few

    @property
    def dropped(self) -> int:
        return sum(map(len, self.later.values())) if self.policy == "drop" else 0

    def keep(self, split: str, size: int) -> np.ndarray:
        """Positions of ``split`` that stay (all of them unless the policy drops)."""
        drop = set(self.later.get(split, [])) if self.policy == "drop" else set()
        return np.asarray([i for i in range(size) if i not in drop], dtype=np.int64)

    def summary(self) -> dict:
        """Logged to MLflow as dataset.duplicates.*: the policy and the counts."""
        return {
            "policy": self.policy,
            "groups": self.groups,
            **{s: len(self.later.get(s, [])) for s in SPLITS[1:]},
            "dropped": self.dropped,
            "within_split": self.within_split,
        }


def find_duplicates(
    digests: Mapping[str, Sequence[bytes]],
    names: Mapping[str, Sequence[str]],
    policy: str,
    data_name: str,
) -> Duplicates:
    """Group the images of every split by pixel digest and apply ``policy`` (see the module).

    ``digests[split][i]`` is the digest of image i of the split, ``names[split][i]`` what a
    message calls it. Raises DataError under ``error`` when a group spans splits.
    """
    found = Duplicates(check_policy(policy))
    first_seen: dict[bytes, tuple[str, int]] = {}
    copies: dict[bytes, Counter[str]] = {}
    for split in [s for s in SPLITS if s in digests]:
        for i, digest in enumerate(digests[split]):
            copies.setdefault(digest, Counter())[split] += 1
            earlier_split, j = first_seen.setdefault(digest, (split, i))
            if earlier_split != split:
                found.later.setdefault(split, []).append(i)
                if len(found.pairs) < _SHOWN:
                    found.pairs.append(f"{names[split][i]} = {names[earlier_split][j]}")
    found.groups = sum(len(c) > 1 for c in copies.values())
    found.within_split = sum(n > 1 for c in copies.values() for n in c.values())
    if found.groups:
        _report(found, data_name)
    return found


def _report(found: Duplicates, data_name: str) -> None:
    copies = ", ".join(f"{len(v)} in {s}" for s, v in found.later.items())
    message = (
        f"data={data_name}: {found.groups} group(s) of identical images span splits; the "
        f"copies in a later split ({copies}) repeat an image of an earlier one, e.g. "
        f"{'; '.join(found.pairs)}. An evaluation image the model trained on inflates its "
        "score."
    )
    if found.policy == "error":
        raise DataError(
            f"{message} Remove the copies, or set data.duplicates=drop to drop the later-split "
            "copies (data.duplicates=warn: run anyway)."
        )
    if found.policy == "drop":
        log.warning(
            "%s Dropped %d later-split copies (data.duplicates=drop).", message, found.dropped
        )
    else:
        log.warning(
            "%s Set data.duplicates=drop to drop the later-split copies, or =error to refuse.",
            message,
        )
