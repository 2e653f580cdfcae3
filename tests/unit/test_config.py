"""config.py: QEMU's blkdebug config format, options, filenames, control words, `blkfuse check`."""

import errno
import json
import pathlib

import pytest
from click.testing import CliRunner

from blkfuse.cli import main
from blkfuse.rules.config import (
    ConfigError,
    format_config,
    format_rule,
    load_rules,
    parse_config_file,
    parse_config_text,
    parse_filename,
    parse_option_string,
    parse_options,
    parse_rule_args,
)
from blkfuse.rules.events import DEFAULT_IOTYPES
from blkfuse.rules.model import InjectError, SetState, Settings

ORACLE = pathlib.Path(__file__).resolve().parents[1] / "data" / "oracle"


def one_rule(body: str, section: str = "inject-error"):
    rules = parse_config_text(f"[{section}]\n{body}", "rules.conf")
    assert len(rules) == 1
    return rules[0]


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "rules.conf")
    return str(info.value)


# --- config file: accepted forms ------------------------------------------------------------


def test_inject_error_defaults():
    rule = one_rule('event = "read_aio"\n')
    assert isinstance(rule, InjectError)
    assert (rule.event, rule.state, rule.errno, rule.sector) == ("read_aio", 0, errno.EIO, -1)
    assert (rule.once, rule.immediately, rule.iotypes) == (False, False, DEFAULT_IOTYPES)
    assert rule.source == "rules.conf:1"


def test_every_inject_error_key():
    rule = one_rule(
        'event = "write_aio"\nstate = "2"\niotype = "flush"\nerrno = "28"\n'
        'sector = "8"\nonce = "on"\nimmediately = "yes"\n'
    )
    assert (rule.event, rule.state, rule.errno, rule.sector) == ("write_aio", 2, 28, 8)
    assert (rule.once, rule.immediately, rule.iotypes) == (True, True, frozenset({"flush"}))


def test_set_state_without_new_state_sets_zero():
    rule = one_rule('event = "flush_to_os"\nstate = "1"\n', "set-state")
    assert isinstance(rule, SetState)
    assert (rule.event, rule.state, rule.new_state) == ("flush_to_os", 1, 0)


def test_rules_keep_file_order_and_header_line_as_source():
    text = (
        '# comment\n\n[set-state]\nevent = "none"\nnew_state = "2"\n'
        '[inject-error]\nevent = "read_aio"\n  \n[inject-error]\nevent = "write_aio"\n'
    )
    rules = parse_config_text(text, "r.conf")
    assert [(r.kind, r.event, r.source) for r in rules] == [
        ("set-state", "none", "r.conf:3"),
        ("inject-error", "read_aio", "r.conf:6"),
        ("inject-error", "write_aio", "r.conf:9"),
    ]


def test_empty_and_comment_only_files_have_no_rules():
    assert parse_config_text("") == []
    assert parse_config_text("# nothing\n\n   \n\t# indented\n") == []


@pytest.mark.parametrize(
    "text, value",
    [("5", 5), ("0x1c", 28), ("0X1C", 28), ("010", 8), ("0", 0), ("+7", 7), (" 9", 9), ("00", 0)],
)
def test_numbers_are_c_base_zero(text, value):
    assert one_rule(f'event = "read_aio"\nerrno = "{text}"\n').errno == value


@pytest.mark.parametrize(
    "word, value",
    [
        ("on", True),
        ("yes", True),
        ("true", True),
        ("y", True),
        ("off", False),
        ("no", False),
        ("false", False),
        ("n", False),
    ],
)
def test_boolean_words(word, value):
    assert one_rule(f'event = "read_aio"\nonce = "{word}"\n').once is value


@pytest.mark.parametrize("name, number", [("ENOSPC", 28), ("EDQUOT", errno.EDQUOT), ("EIO", 5)])
def test_errno_by_name(name, number):
    assert one_rule(f'event = "read_aio"\nerrno = "{name}"\n').errno == number


def test_errno_zero_is_allowed():
    assert one_rule('event = "read_aio"\nerrno = "0"\n').errno == 0


def test_dotted_alias_maps_to_todays_name():
    assert one_rule('event = "pwritev_rmw.head"\n').event == "pwritev_rmw_head"


def test_repeated_key_later_value_wins_and_earlier_is_not_checked():
    # QEMU overwrites the value in its dict: the earlier, bad one is never looked at.
    rule = one_rule('event = "bogus"\nevent = "read_aio"\nerrno = "x"\nerrno = "7"\n')
    assert (rule.event, rule.errno) == ("read_aio", 7)


def test_repeated_iotype_later_wins():
    assert one_rule('event = "read_aio"\niotype = "read"\niotype = "write"\n').iotypes == {"write"}


def test_section_id_and_spacing_variants_accepted():
    rule = one_rule('event ="read_aio"\n\terrno\t=\t"3"\r\n', 'inject-error "first"')
    assert (rule.event, rule.errno) == ("read_aio", 3)


def test_crlf_lines():
    rules = parse_config_text('[inject-error]\r\nevent = "read_aio"\r\n\r\n', "w.conf")
    assert rules[0].event == "read_aio"


def test_block_status_iotype_is_accepted():
    assert one_rule('event = "read_aio"\niotype = "block-status"\n').iotypes == {"block-status"}


# --- config file: errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[inject-error]\nevent = "write_aoi"\n',
            'rules.conf:2: unknown event "write_aoi" (did you mean "write_aio"?)',
        ),
        (
            '[inject-eror]\nevent = "read_aio"\n',
            'rules.conf:1: unknown section "inject-eror" (did you mean "inject-error"?)',
        ),
        (
            '[inject-error]\nevent = "read_aio"\nevnt = "x"\n',
            'rules.conf:3: unknown inject-error key "evnt" (did you mean "event"?)',
        ),
        (
            '[inject-error]\nevent = "read_aio"\niotype = "wirte"\n',
            'rules.conf:3: unknown io type "wirte" (did you mean "write"?)',
        ),
        (
            '[inject-error]\nevent = "read_aio"\nerrno = "ENOSCP"\n',
            'rules.conf:3: unknown errno name "ENOSCP" (did you mean "ENOSPC"?)',
        ),
        (
            '[inject-error]\nevent = "read_aio"\nerrno = "enospc"\n',
            'rules.conf:3: unknown errno name "enospc" (did you mean "ENOSPC"?)',
        ),
        (
            '[inject-error]\nevent = "read_aio"\nnew_state = "2"\n',
            'rules.conf:3: "new_state" is a key of set-state rules, not of inject-error rules',
        ),
    ],
)
def test_errors_name_line_and_suggest(text, message):
    assert config_error(text) == message


@pytest.mark.parametrize(
    "text, line, words",
    [
        ('[inject-error]\nevent = read_aio\n', 2, "double quotes"),
        ('[inject-error]\nevent="read_aio"\n', 2, 'space before "="'),
        ('[inject-error]\nevent = "read_aio\n', 2, "closing double quote"),
        ('[inject-error]\nevent = "read_aio" junk\n', 2, "after the closing quote"),
        ('[inject-error]\nstate = "1"\n', 1, "has no event"),
        ('[set-state]\nnew_state = "1"\n', 1, "has no event"),
        ('[inject-error]\n[set-state]\nevent = "none"\n', 1, "has no event"),
        ('event = "read_aio"\n', 1, "outside any section"),
        ('  # indented\nevent = "read_aio"\n', 2, "outside any section"),
        ('[inject-error]\nevent = "read_aio"\nonce = "1"\n', 3, "on or off"),
        ('[inject-error]\nevent = "read_aio"\nonce = "0"\n', 3, "on or off"),
        ('[inject-error]\nevent = "read_aio"\nonce = "ON"\n', 3, "on or off"),
        ('[inject-error]\nevent = "read_aio"\nerrno = "-5"\n', 3, "negative"),
        ('[inject-error]\nevent = "read_aio"\nsector = "-1"\n', 3, "negative"),
        ('[set-state]\nevent = "none"\nnew_state = "-1"\n', 3, "negative"),
        ('[inject-error]\nevent = "read_aio"\nerrno = "08"\n', 3, "expects a number"),
        ('[inject-error]\nevent = "read_aio"\nerrno = "5 "\n', 3, "expects a number"),
        ('[inject-error]\nevent = "read_aio"\nerrno = ""\n', 3, "expects a number"),
        ('[inject-error]\nevent = "read_aio"\nerrno = "0x"\n', 3, "expects a number"),
        ('[inject-error]\nevent = "read_aio"\nsector = "1k"\n', 3, "expects a number"),
        ('[inject-error]\nevent = "read_aio"\nerrno = "512"\n', 3, "too large"),
        ('[inject-error]\nevent = "read_aio"\nstate = "99999999999999999999"\n', 3, "too large"),
        ('[inject-error]\nevent = "read_aio"\niotype = "read,write"\n', 3, "one io type"),
        ('[inject-error]\nevent = "read_aio"\niotype = ""\n', 3, "unknown io type"),
        ('[inject-error]\nevent = ""\n', 2, "unknown event"),
        ('[foo]\n', 1, "unknown section"),
        ('[ inject-error ]\n', 1, "malformed section header"),
        ('[inject-error "1"]\nevent = "read_aio"\n', 1, "must start with a letter"),
        (
            '[inject-error "a"]\nevent = "none"\n[inject-error "a"]\nevent = "none"\n',
            3,
            "duplicate id",
        ),
        ('[set-state]\nevent = "none"\nerrno = "5"\n', 3, "key of inject-error rules"),
        ('[inject-error]\njust words\n', 2, 'expected key = "value"'),
    ],
)
def test_errors_name_the_line(text, line, words):
    message = config_error(text)
    assert message.startswith(f"rules.conf:{line}: ")
    assert words in message


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="missing.conf: cannot read the config file"):
        parse_config_file(str(tmp_path / "missing.conf"))


def test_config_file_with_invalid_utf8(tmp_path):
    path = tmp_path / "bad.conf"
    path.write_bytes(b'[inject-error]\nevent = "read_\xffaio"\n')
    with pytest.raises(ConfigError, match=r"bad.conf:2: unknown event"):
        parse_config_file(str(path))


def test_config_file_reads_rules(tmp_path):
    path = tmp_path / "rules.conf"
    path.write_text('[inject-error]\nevent = "read_aio"\nerrno = "28"\n')
    [rule] = parse_config_file(str(path))
    assert (rule.errno, rule.source) == (28, f"{path}:1")


# --- oracle cases (real qemu-io 7.2 verdicts, copied from the shared oracle) -------------------


def oracle_case(name):
    return json.loads((ORACLE / f"{name}.json").read_text())


@pytest.mark.parametrize(
    "name",
    [
        "config_bool_numeric_rejected",
        "config_unknown_event_rejected",
        "config_unquoted_values_rejected",
    ],
)
def test_oracle_config_rejections(name):
    case = oracle_case(name)
    assert case["expect"] == ["NOT_RUN"]  # QEMU refused to open
    with pytest.raises(ConfigError):
        parse_config_text(case["config"], "blkdebug.conf")


def test_oracle_inline_rules_via_options():
    case = oracle_case("inline_rules_via_options")
    options = {key: str(value) for key, value in case["blkdebug_opts"].items()}
    rules, _ = parse_options(options)
    inject, set_state = rules
    assert (inject.event, inject.state, inject.errno) == ("read_aio", 2, errno.ENOSPC)
    assert (set_state.event, set_state.state, set_state.new_state) == ("flush_to_os", 1, 2)


# --- options --------------------------------------------------------------------------------


def test_option_string_split_and_comma_escape():
    assert parse_option_string("") == {}
    assert parse_option_string("a=1,b=x,,y,c=") == {"a": "1", "b": "x,y", "c": ""}
    assert parse_option_string("k=a=b") == {"k": "a=b"}


@pytest.mark.parametrize("text", ["a", "a=1,", ",a=1", "=1", "a=1,,,b"])
def test_option_string_errors(text):
    with pytest.raises(ConfigError):
        parse_option_string(text)


def test_options_make_rules_by_number_and_settings():
    options = parse_option_string(
        "inject-error.1.event=write_aio,inject-error.0.event=read_aio,inject-error.0.errno=28,"
        "set-state.0.event=none,set-state.0.new_state=2,align=4k,max-transfer=64k,config=r.conf"
    )
    rules, settings = parse_options(options)
    assert [(r.kind, r.event, r.source) for r in rules] == [
        ("inject-error", "read_aio", "-o inject-error.0"),
        ("inject-error", "write_aio", "-o inject-error.1"),
        ("set-state", "none", "-o set-state.0"),
    ]
    assert rules[0].errno == 28
    assert (settings.align, settings.max_transfer, settings.config_path) == (4096, 65536, "r.conf")
    assert settings.options == options


def test_option_rule_numbers_are_numeric_not_textual():
    options = {f"inject-error.{n}.event": "read_aio" for n in range(12)}
    options.update({f"inject-error.{n}.errno": str(n + 1) for n in range(12)})
    rules, _ = parse_options(options)
    assert [r.errno for r in rules] == list(range(1, 13))


def test_option_values_may_be_quoted():
    rules, settings = parse_options({"inject-error.0.event": '"read_aio"', "align": '"512"'})
    assert (rules[0].event, settings.align) == ("read_aio", 512)


def test_unnumbered_single_rule_form():
    rules, _ = parse_options({"inject-error.event": "read_aio", "inject-error.errno": "28"})
    assert [(r.event, r.errno, r.source) for r in rules] == [("read_aio", 28, "-o inject-error")]


def test_image_options():
    assert parse_options({"x-image": "a.img"})[1].image == "a.img"
    assert parse_options({"image": "b.img"})[1].image == "b.img"


@pytest.mark.parametrize(
    "text, value",
    [
        ("512", 512),
        ("4k", 4096),
        ("4K", 4096),
        ("1M", 2**20),
        ("1G", 2**30),
        ("0x1000", 4096),
        ("010", 8 + 2),
        ("4096.0", 4096),
        ("512b", 512),
    ],
)
def test_sizes_like_qemu(text, value):
    assert parse_options({"max-transfer": text})[1].max_transfer == value


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"inject-error.0.evnt": "read_aio"},
            'option inject-error.0.evnt: unknown inject-error key "evnt" (did you mean "event"?)',
        ),
        (
            {"inject-error.0.event": "write_aoi"},
            'option inject-error.0.event: unknown event "write_aoi" (did you mean "write_aio"?)',
        ),
        (
            {"inject_error.0.event": "read_aio"},
            'option inject_error.0.event: unknown option "inject_error" (did you mean "inject-error"?)',
        ),
        (
            {"max_transfer": "4k"},
            'option max_transfer: unknown option "max_transfer" (did you mean "max-transfer"?)',
        ),
        ({"align": "0"}, 'option align: must be a positive power of two below 2^31, not "0"'),
        ({"align": "3"}, 'option align: must be a positive power of two below 2^31, not "3"'),
        (
            {"align": "4096", "max-transfer": "512"},
            "option max-transfer: 512 is not a multiple of align=4096",
        ),
        (
            {"inject-error.1.event": "read_aio"},
            "option inject-error.1.event: rules are numbered from 0 without gaps, and inject-error.0 is missing",
        ),
        (
            {"set-state.0.state": "1"},
            "option set-state.0: set-state rule has no event (every rule needs one)",
        ),
    ],
)
def test_option_errors_name_the_key(options, message):
    with pytest.raises(ConfigError) as info:
        parse_options(options)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "options",
    [
        {"align": "4kB"},
        {"align": "4 k"},
        {"max-transfer": "0"},
        {"max-transfer": "2G"},
        {"inject-error.00.event": "read_aio"},
        {"inject-error.0": "x"},
        {"inject-error": "x"},
        {"inject-error.event": "read_aio", "inject-error.0.event": "read_aio"},
        {"inject-error.0.event": "read_aio", "inject-error.0.once": "1"},
        {"config": ""},
        {"inject-error.0.event": "read_aio", "inject-error.0.a.b": "1"},
    ],
)
def test_option_errors(options):
    with pytest.raises(ConfigError, match=r"^option "):
        parse_options(options)


def test_max_transfer_need_not_be_a_multiple_of_512_without_align():
    # QEMU only requires a multiple of the alignment, which is 1 for a plain file.
    assert parse_options({"max-transfer": "1000"})[1].max_transfer == 1000


def test_load_rules_puts_config_file_rules_first(tmp_path):
    path = tmp_path / "r.conf"
    path.write_text('[inject-error]\nevent = "write_aio"\n')
    settings = Settings(config_path=str(path), options={"inject-error.0.event": "read_aio"})
    assert [r.event for r in load_rules(settings)] == ["write_aio", "read_aio"]
    assert load_rules(Settings()) == []


# --- filename form --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, result",
    [
        ("blkdebug:rules.conf:disk.img", ("rules.conf", "disk.img")),
        ("blkdebug::disk.img", (None, "disk.img")),
        ("blkdebug:r.conf:dir:with:colons.img", ("r.conf", "dir:with:colons.img")),
        ("disk.img", (None, "disk.img")),
        ("/abs/blkdebug:x", (None, "/abs/blkdebug:x")),
    ],
)
def test_parse_filename(spec, result):
    assert parse_filename(spec) == result


@pytest.mark.parametrize("spec", ["blkdebug:x", "blkdebug:", "blkdebug:r.conf:"])
def test_parse_filename_errors(spec):
    with pytest.raises(ConfigError):
        parse_filename(spec)


# --- control words --------------------------------------------------------------------------


def test_rule_args_quoted_and_unquoted():
    rule = parse_rule_args("inject-error", ["event=read_aio", 'errno="ENOSPC"', "once=on"])
    assert (rule.event, rule.errno, rule.once, rule.source) == ("read_aio", 28, True, "control")


def test_rule_args_set_state():
    rule = parse_rule_args("set-state", ["event=none", "state=1", "new_state=3"], source="ctl")
    assert (rule.state, rule.new_state, rule.source) == (1, 3, "ctl")


@pytest.mark.parametrize(
    "kind, pairs, message",
    [
        (
            "inject-error",
            ["evnt=read_aio"],
            'control: unknown inject-error key "evnt" (did you mean "event"?)',
        ),
        (
            "inject-error",
            ["event=read_aoi"],
            'control: unknown event "read_aoi" (did you mean "read_aio"?)',
        ),
        (
            "inject_error",
            ["event=read_aio"],
            'control: unknown rule kind "inject_error" (did you mean "inject-error"?)',
        ),
        ("inject-error", ["event"], 'control: expected KEY=VALUE, not "event"'),
        ("inject-error", ['event="read_aio'], 'control: badly quoted value "read_aio'),
        (
            "inject-error",
            ["errno=5"],
            "control: inject-error rule has no event (every rule needs one)",
        ),
        (
            "set-state",
            ["event=none", "new_state=-1"],
            'control: new_state must not be negative, not "-1"',
        ),
    ],
)
def test_rule_args_errors(kind, pairs, message):
    with pytest.raises(ConfigError) as info:
        parse_rule_args(kind, pairs)
    assert str(info.value) == message


# --- formatting -----------------------------------------------------------------------------


def test_format_rule():
    rule = one_rule('event = "read_aio"\nerrno = "5"\nsector = "8"\nonce = "on"\n')
    assert format_rule(rule) == "inject-error event=read_aio errno=5 sector=8 once=on"
    rule = one_rule('event = "none"\nstate = "1"\nnew_state = "2"\n', "set-state")
    assert format_rule(rule) == "set-state event=none state=1 new_state=2"
    rule = one_rule('event = "write_aio"\niotype = "flush"\nimmediately = "y"\nerrno = "0"\n')
    assert format_rule(rule) == "inject-error event=write_aio iotype=flush errno=0 immediately=on"


def test_format_config_reads_back():
    text = '[inject-error]\nevent = "read_aio"\nstate = "3"\nerrno = "28"\n\n[set-state]\nevent = "none"\nnew_state = "3"\n'
    rules = parse_config_text(text)
    assert format_config(rules) == text


# --- blkfuse check --------------------------------------------------------------------------


def run_check(*args):
    return CliRunner().invoke(main, ["check", *args])


def test_check_lists_rules_and_summary(tmp_path):
    path = tmp_path / "rules.conf"
    path.write_text(
        '[inject-error]\nevent = "read_aio"\nerrno = "28"\n\n[set-state]\nevent = "l2_load"\n'
    )
    result = run_check(str(path), "-o", "inject-error.0.event=write_aio", "-o", "align=4k")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{path}:1: inject-error event=read_aio errno=28",
        f'{path}:5: set-state event=l2_load new_state=0 (never fires: no request through a '
        'blkfuse mount raises "l2_load") (warning: new_state is 0, what a missing new_state '
        "means: from then on only rules without a state match)",
        "-o inject-error.0: inject-error event=write_aio errno=5",
        f"{path}: OK, 3 rules (2 inject-error, 1 set-state), align=4096",
    ]


def test_check_marks_qemu_io_options_not_portable(tmp_path):
    path = tmp_path / "rules.conf"
    path.write_text('[inject-error]\nevent = "pwritev_zero"\n')
    result = run_check(str(path), "-o", "cache=unsafe,format=none,opt-discard=4k")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{path}:1: inject-error event=pwritev_zero errno=5",
        f"{path}: OK, 1 rule (1 inject-error), opt-discard=4096, "
        "cache=unsafe (not portable: qemu-io -t unsafe), "
        "format=none (not portable: qemu-io --image-opts driver=blkdebug,...)",
    ]


def test_check_reports_error_and_exits_1(tmp_path):
    path = tmp_path / "rules.conf"
    path.write_text('[inject-error]\nevent = "write_aoi"\n')
    result = run_check(str(path))
    assert result.exit_code == 1
    assert f'{path}:2: unknown event "write_aoi" (did you mean "write_aio"?)' in result.output
    assert "OK" not in result.output


def test_check_reports_bad_option(tmp_path):
    path = tmp_path / "rules.conf"
    path.write_text("")
    result = run_check(str(path), "-o", "aling=4096")
    assert result.exit_code == 1
    assert 'unknown option "aling" (did you mean "align"?)' in result.output


def test_check_missing_file(tmp_path):
    result = run_check(str(tmp_path / "nope.conf"))
    assert result.exit_code == 1
    assert "cannot read the config file" in result.output


# ---- power-cut keys and options (blkfuse extensions, README "Power cuts") -------------------


def test_power_keys_parse_in_every_spelling_and_round_trip():
    from blkfuse.rules.config import format_rule, parse_config_text, parse_options, parse_rule_args

    text = '[inject-error]\nevent = "flush_to_disk"\ndrop-unsynced = "on"\ntorn = "3"\n'
    (from_file,) = parse_config_text(text, "p.conf")
    (from_option,), settings = parse_options(
        {
            "inject-error.0.event": "flush_to_disk",
            "inject-error.0.drop-unsynced": "on",
            "inject-error.0.torn": "3",
            "track-unsynced": "on",
            "unsynced-cap": "1M",
            "atomic": "4k",
        }
    )
    from_control = parse_rule_args(
        "inject-error", ["event=flush_to_disk", "drop-unsynced=on", "torn=3"]
    )
    for rule in (from_file, from_option, from_control):
        assert (rule.torn, rule.drop_unsynced) == (3, True)
        again = parse_rule_args("inject-error", format_rule(rule).split()[1:])
        assert (again.torn, again.drop_unsynced) == (3, True)
    assert (settings.track_unsynced, settings.unsynced_cap, settings.atomic) == (
        True,
        1 << 20,
        4096,
    )


@pytest.mark.parametrize(
    "line, message",
    [
        ('torn = "-1"', "torn must be a number of sectors"),
        ('torn = "many"', "torn expects a number"),
        ('drop-unsynced = "1"', "drop-unsynced expects on or off"),
        ('drop_unsynced = "on"', 'did you mean "drop-unsynced"'),
    ],
)
def test_bad_power_keys_name_the_problem(line, message):
    from blkfuse.rules.config import parse_config_text

    with pytest.raises(ConfigError) as e:
        parse_config_text(f'[inject-error]\nevent = "none"\n{line}\n', "p.conf")
    assert "p.conf:3" in str(e.value) and message in str(e.value)


def test_power_rules_are_not_keys_of_set_state():
    from blkfuse.rules.config import parse_config_text

    with pytest.raises(ConfigError) as e:
        parse_config_text('[set-state]\nevent = "none"\ntorn = "1"\n', "p.conf")
    assert "inject-error rules" in str(e.value)
