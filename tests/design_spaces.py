"""The two design spaces our MetaSchedule rules return, told apart by content, not order.

Each rule returns [knobs drawn, hand-written default]; MetaSchedule's post-order-apply
generator does not keep that order (it came back reversed on a Zen 3 host, in order on Zen 5).
"""

from __future__ import annotations

from tvm import s_tir


def knob_draws(sch: s_tir.Schedule) -> list:
    """The SampleCategorical instructions of a schedule's trace: its tunable knobs."""
    return [i for i in sch.trace.insts if i.kind.name == "SampleCategorical"]


def sampled_and_fixed(spaces: list[s_tir.Schedule]) -> tuple[s_tir.Schedule, s_tir.Schedule]:
    """(the space whose knobs are drawn, the default with none drawn); asserts there are both."""
    sampled = [s for s in spaces if knob_draws(s)]
    fixed = [s for s in spaces if not knob_draws(s)]
    assert len(spaces) == 2 and len(sampled) == 1 and len(fixed) == 1, (
        f"expected one space with knob draws and one without, got {len(sampled)} and "
        f"{len(fixed)} of {len(spaces)}")
    return sampled[0], fixed[0]
