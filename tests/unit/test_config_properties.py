"""Properties of config.py: it never crashes on any input, and formatting round-trips."""

import shlex

from hypothesis import given, settings, strategies as st

from blkfuse.rules.config import (
    ConfigError,
    format_config,
    format_rule,
    parse_config_text,
    parse_filename,
    parse_option_string,
    parse_options,
    parse_rule_args,
)
from blkfuse.rules.events import DEFAULT_IOTYPES, EVENTS, IOTYPES
from blkfuse.rules.model import InjectError, SetState


def rule_fields(rule):
    """What a rule means (the dataclasses compare by identity, eq=False)."""
    if isinstance(rule, SetState):
        return ("set-state", rule.event, rule.state, rule.new_state)
    return (
        "inject-error",
        rule.event,
        rule.state,
        rule.errno,
        rule.sector,
        rule.once,
        rule.immediately,
        rule.iotypes,
    )


def only_config_errors(parse, *args):
    try:
        parse(*args)
    except ConfigError:
        pass


# Text made of the config language's own pieces finds deeper paths than random letters.
config_atoms = st.sampled_from(
    [
        "[inject-error]",
        "[set-state]",
        '[inject-error "a"]',
        "[",
        "]",
        "event",
        "errno",
        "state",
        "new_state",
        "sector",
        "once",
        "iotype",
        "immediately",
        "id",
        " = ",
        "=",
        '"',
        "read_aio",
        "none",
        "0x1f",
        "010",
        "-1",
        "on",
        "ENOSPC",
        "write,read",
        "\n",
        "\r\n",
        "#",
        " ",
        "\t",
        "\x00",
        "\u2028",
        "\x85",
        "é",
        "٣",
        "1_0",
    ]
)
config_like_text = st.lists(config_atoms, max_size=40).map("".join)


@settings(max_examples=400)
@given(st.text())
def test_config_text_never_crashes(text):
    only_config_errors(parse_config_text, text, "r.conf")


@settings(max_examples=400)
@given(st.binary().map(lambda data: data.decode("utf-8", errors="replace")))
def test_config_bytes_never_crash(text):
    only_config_errors(parse_config_text, text, "r.conf")


@settings(max_examples=600)
@given(config_like_text)
def test_config_like_text_never_crashes(text):
    only_config_errors(parse_config_text, text, "r.conf")


@given(
    st.dictionaries(
        st.one_of(
            st.text(max_size=30),
            st.sampled_from(
                [
                    "inject-error.0.event",
                    "inject-error.1.event",
                    "inject-error.0.errno",
                    "set-state.0.event",
                    "inject-error.event",
                    "align",
                    "max-transfer",
                    "config",
                    "x-image",
                    "inject-error.00.state",
                ]
            ),
        ),
        st.one_of(
            st.text(max_size=12), st.sampled_from(["read_aio", "4k", "0x200", "1.5k", "512"])
        ),
    )
)
def test_options_never_crash(options):
    only_config_errors(parse_options, options)


@given(st.text())
def test_option_string_and_filename_never_crash(text):
    only_config_errors(parse_option_string, text)
    only_config_errors(parse_filename, text)
    only_config_errors(parse_filename, "blkdebug:" + text)


@given(
    st.sampled_from(["inject-error", "set-state", "x"]), st.lists(st.text(max_size=20), max_size=6)
)
def test_rule_args_never_crash(kind, pairs):
    only_config_errors(parse_rule_args, kind, pairs)


def test_crash_inputs_found_so_far():
    for text in [
        "[inject-error]\nevent = \"\u0663\"",
        "[inject-error]\nerrno \t= \"\u0663\"",
        "[\x00]",
        "\u2028event = \"x\"",
        "[inject-error]\nstate = \"1_0\"",
    ]:
        only_config_errors(parse_config_text, text)


# --- round trips ------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=2**31 - 1)
inject_rules = st.builds(
    InjectError,
    event=st.sampled_from(EVENTS),
    state=counts,
    errno=st.integers(min_value=0, max_value=511),
    sector=st.one_of(st.just(-1), st.integers(min_value=0, max_value=2**63 - 1)),
    once=st.booleans(),
    immediately=st.booleans(),
    iotypes=st.one_of(
        st.just(DEFAULT_IOTYPES), st.sampled_from(IOTYPES).map(lambda t: frozenset({t}))
    ),
)
set_state_rules = st.builds(SetState, event=st.sampled_from(EVENTS), state=counts, new_state=counts)
any_rules = st.lists(st.one_of(inject_rules, set_state_rules), max_size=20)


@given(any_rules)
def test_config_text_round_trip(rules):
    parsed = parse_config_text(format_config(rules))
    assert [rule_fields(r) for r in parsed] == [rule_fields(r) for r in rules]


@given(st.one_of(inject_rules, set_state_rules))
def test_format_rule_round_trips_through_control_words(rule):
    kind, *pairs = shlex.split(format_rule(rule))
    assert rule_fields(parse_rule_args(kind, pairs)) == rule_fields(rule)


@given(any_rules)
def test_options_round_trip(rules):
    # The same rules written as blockdev options come back in the same order within each kind.
    options = {}
    numbers = {"inject-error": 0, "set-state": 0}
    for rule in rules:
        n = numbers[rule.kind]
        numbers[rule.kind] += 1
        for word in format_rule(rule).split()[1:]:
            key, _, value = word.partition("=")
            options[f"{rule.kind}.{n}.{key}"] = value
    parsed, _ = parse_options(options)
    by_kind = sorted(rules, key=lambda r: r.kind != "inject-error")  # stable: file order kept
    assert [rule_fields(r) for r in parsed] == [rule_fields(r) for r in by_kind]
