"""The isolation layers, one module each.

Every layer has the same shape:

- `plan(spec, ...) -> XPlan`: pure; frozen data that can be printed and compared.
  Invalid requests fail here, before anything on the system changes.
- `XPlan.describe() -> list[str]`: what the layer will do, in words (`nsbox plan`).
- one or more step functions, verbs that run in exactly one role and appear once in
  `nsbox.launch.SEQUENCE` (e.g. `userns.unshare` in the holder, `userns.write_maps` in
  the launcher).

Records here and in every module `nsbox run` imports are `typing.NamedTuple`s, not
dataclasses: building a dataclass compiles its methods at import (about 1 ms each, and
`import dataclasses` costs 10 ms more), paid on every launch. A NamedTuple is a tuple,
so a plan with no fields would be false: those are `FieldlessPlan`s (`if plans.caps`
means "not removed"). tests/test_imports.py keeps dataclasses off the launch path.
"""


class FieldlessPlan:
    """A plan with nothing to choose (caps, nnp, pidns): the same on every run.

    A plain class, not a NamedTuple, which would be an empty tuple and so false. Equal
    to any plan of its own class, and printed as `CapsPlan()`, as frozen data would be.
    """

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
