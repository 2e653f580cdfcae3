"""QEMU's recorded blkdebug answers (7.2: tests/data/oracle/*.json; 10.0: qemu-10.0/), replayed against blkfuse.

Every case runs on two targets: the block layer directly ("block") and a real FUSE mount
("mount"). Per command the outcome must equal QEMU's, and the image afterwards must equal
QEMU's final image. Every case is expressed (write -z, discard, alloc/map, cache modes and
format=none included); for the deliberate differences (DELIBERATE) blkfuse's documented
behaviour is asserted instead of QEMU's.
"""

import pytest

import oracle

CASES = oracle.case_names()
TARGETS = {"block": oracle.replay_block, "mount": oracle.replay_mount}


def test_cases_are_copied_into_the_repo():
    assert len(CASES) >= 51
    for qemu in oracle.QEMU_VERSIONS:  # every version answers every case
        assert [oracle.load_case(name, qemu)["name"] for name in CASES] == CASES
    assert set(oracle.DELIBERATE) <= set(CASES), set(oracle.DELIBERATE) - set(CASES)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("qemu", oracle.QEMU_VERSIONS)
@pytest.mark.parametrize("name", CASES)
def test_case(name, qemu, target, tmp_path):
    """QEMU `qemu`'s recorded answers, through blkfuse with -o qemu=`qemu`."""
    if target == "mount":
        why_not = oracle.mount_available()
        if why_not:
            pytest.skip(why_not)
    case = oracle.load_case(name, qemu)
    exp = oracle.expectation(case, target)
    got = TARGETS[target](case, tmp_path)
    problems = oracle.compare(case, exp, got)
    if exp.expect and all(e == "NOT_RUN" for e in exp.expect):
        # Refused for the right reason: a message pointing into the config file.
        if not (got.config_error and "blkdebug.conf:" in got.config_error):
            problems.append(
                f"expected a config error naming blkdebug.conf:LINE, got {got.config_error!r}"
            )
    assert not problems, (
        f"{name} ({target}) disagrees with QEMU {qemu}"
        + (f" [{exp.note}]" if exp.note else "")
        + ":\n  "
        + "\n  ".join(problems)
        + f"\n  config: {case['config']!r}\n  ops: {case['ops']}\n  got: {got.outcomes}"
        + (f"\n  config error: {got.config_error}" if got.config_error else "")
    )


def test_negative_errno_is_a_config_error(tmp_path):
    """Deliberate difference: QEMU skips the I/O for errno < 0; blkfuse refuses the config."""
    from blkfuse.rules.config import ConfigError, parse_config_text

    case = oracle.load_case("errno_negative_skips_io")
    with pytest.raises(ConfigError) as info:
        parse_config_text(case["config"], "rules.conf")
    assert "rules.conf" in str(info.value)


def test_failed_rmw_read_fails_the_write_and_keeps_data(tmp_path):
    """Deliberate difference: with align, a failed padding read fails the write with its errno."""
    case = oracle.load_case("data_rmw_read_failure_ignored")
    got = oracle.replay_block(case, tmp_path)
    assert got.outcomes[0] == "EIO"
    assert got.image == oracle.image_from_runs(case["image_size"], case["image_init"])
