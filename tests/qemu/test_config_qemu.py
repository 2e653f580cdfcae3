"""Differential: config.py accepts exactly what QEMU 7.2's blkdebug accepts, save listed choices.

Each config snippet (and each options string) goes through both the real `qemu-io` and our
parser. They must agree on accept/reject, except for the deliberate differences listed with a
reason; for those the test checks that they really do differ, so the list stays true.
"""

import shutil
import subprocess

import pytest

from blkfuse.rules.config import ConfigError, parse_config_text, parse_option_string, parse_options

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io is not installed"),
]

EV = 'event = "read_aio"\n'
IE = "[inject-error]\n"

# (id, config text, None or the reason blkfuse deliberately decides the other way)
CONFIG_CASES = [
    ("plain", IE + EV, None),
    (
        "every-key",
        IE + EV + 'state = "0"\niotype = "read"\nerrno = "28"\nsector = "0"\n'
        'once = "on"\nimmediately = "yes"\n',
        None,
    ),
    ("empty-file", "", None),
    ("comments-and-blank-lines", "# c\n\n" + IE + "\n# d\n" + EV + "\n", None),
    ("unquoted", IE + "event = read_aio\n", None),
    ("no-space-before-equals", IE + 'event="read_aio"\n', None),
    ("space-only-before-equals", IE + 'event ="read_aio"\n', None),
    ("tabs", IE + 'event\t=\t"read_aio"\n', None),
    ("crlf", IE.replace("\n", "\r\n") + EV.replace("\n", "\r\n"), None),
    ("bool-y", IE + EV + 'once = "y"\n', None),
    ("bool-false", IE + EV + 'once = "false"\n', None),
    ("bool-1", IE + EV + 'once = "1"\n', None),
    ("bool-0", IE + EV + 'immediately = "0"\n', None),
    ("bool-upper", IE + EV + 'once = "ON"\n', None),
    ("octal", IE + EV + 'errno = "010"\n', None),
    ("bad-octal", IE + EV + 'errno = "08"\n', None),
    ("hex", IE + EV + 'errno = "0x1c"\n', None),
    ("plus-sign", IE + EV + 'errno = "+5"\n', None),
    ("leading-space-number", IE + EV + 'errno = " 5"\n', None),
    ("trailing-space-number", IE + EV + 'errno = "5 "\n', None),
    ("empty-number", IE + EV + 'errno = ""\n', None),
    ("size-suffix-in-number", IE + EV + 'sector = "1k"\n', None),
    ("state-too-large", IE + EV + 'state = "99999999999999999999"\n', None),
    ("errno-zero", IE + EV + 'errno = "0"\n', None),
    ("missing-event", IE + 'errno = "5"\n', None),
    ("empty-section-then-rule", IE + "[set-state]\n" + EV, None),
    ("empty-event", IE + 'event = ""\n', None),
    ("unknown-event", IE + 'event = "read_aoi"\n', None),
    ("unknown-key", IE + EV + 'evnt = "x"\n', None),
    ("unknown-section", "[inject_error]\n" + EV, None),
    ("spaced-section", "[ inject-error ]\n" + EV, None),
    ("key-before-section", EV, None),
    ("two-iotypes-in-one", IE + EV + 'iotype = "read,write"\n', None),
    ("iotype-twice-later-wins", IE + EV + 'iotype = "read"\niotype = "write"\n', None),
    ("iotype-block-status", IE + EV + 'iotype = "block-status"\n', None),
    ("iotype-typo", IE + EV + 'iotype = "wirte"\n', None),
    ("bad-then-good-event", IE + 'event = "bogus"\n' + EV, None),
    ("good-then-bad-event", IE + EV + 'event = "bogus"\n', None),
    ("set-state-no-new-state", "[set-state]\n" + EV + 'state = "1"\n', None),
    ("set-state-with-errno", "[set-state]\n" + EV + 'errno = "5"\n', None),
    ("inject-with-new-state", IE + EV + 'new_state = "2"\n', None),
    ("section-id", '[inject-error "first"]\n' + EV, None),
    ("section-id-not-identifier", '[inject-error "1"]\n' + EV, None),
    ("duplicate-section-id", '[inject-error "a"]\n' + EV + '[inject-error "a"]\n' + EV, None),
    ("id-key", IE + EV + 'id = "z"\n', None),
    # --- deliberate differences ---
    (
        "header-trailing-text",
        "[inject-error] junk\n" + EV,
        "QEMU ignores text after a section header; blkfuse refuses",
    ),
    (
        "negative-errno",
        IE + EV + 'errno = "-5"\n',
        "QEMU wraps -5 to an errno that silently skips the I/O; blkfuse refuses it",
    ),
    (
        "negative-sector",
        IE + EV + 'sector = "-1"\n',
        'QEMU wraps "-1" to "any sector"; blkfuse asks you to leave sector out',
    ),
    ("errno-name", IE + EV + 'errno = "ENOSPC"\n', "blkfuse also takes errno names"),
    (
        "errno-over-fuse-limit",
        IE + EV + 'errno = "600"\n',
        "a FUSE reply cannot carry an errno above 511",
    ),
    (
        "state-wraps-int",
        IE + EV + 'state = "4294967297"\n',
        "QEMU silently truncates a state to an int; blkfuse refuses",
    ),
    (
        "dotted-alias",
        IE + 'event = "pwritev_rmw.head"\n',
        "pre-2015 dotted names, which QEMU 7.2 no longer knows, still work in blkfuse",
    ),
    (
        "trailing-text",
        IE + 'event = "read_aio" junk\n',
        "QEMU ignores text after the closing quote, hiding typos; blkfuse refuses",
    ),
    ("whitespace-only-line", IE + "   \n" + EV, "blkfuse allows blank lines with spaces"),
    ("indented-comment", "  # c\n" + IE + EV, "blkfuse allows indented comments"),
    ("crlf-blank-line", IE + "\r\n" + EV, "blkfuse allows Windows blank lines"),
]

# (id, options without the "file." prefix, None or the reason for a deliberate difference)
OPTION_CASES = [
    ("align-4k", "align=4k", None),
    ("align-3", "align=3", None),
    ("align-fraction-not-power-of-two", "align=1.5k", None),
    ("align-bad-suffix", "align=4kB", None),
    ("max-transfer-1000", "max-transfer=1000", None),
    ("max-transfer-fraction", "max-transfer=1.5k", None),
    ("max-transfer-below-align", "align=4096,max-transfer=512", None),
    ("max-transfer-too-large", "max-transfer=2G", None),
    (
        "rules",
        "inject-error.0.event=read_aio,inject-error.0.errno=28,inject-error.1.event=write_aio,"
        "set-state.0.event=none,set-state.0.new_state=2",
        None,
    ),
    ("index-gap", "inject-error.0.event=read_aio,inject-error.2.event=read_aio", None),
    ("index-not-from-zero", "inject-error.1.event=read_aio", None),
    ("index-leading-zero", "inject-error.00.event=read_aio", None),
    ("unnumbered-rule", "inject-error.event=read_aio", None),
    ("unnumbered-and-numbered", "inject-error.event=read_aio,inject-error.0.event=read_aio", None),
    ("bool-1", "inject-error.0.event=read_aio,inject-error.0.once=1", None),
    ("unknown-rule-key", "inject-error.0.event=read_aio,inject-error.0.evnt=x", None),
    ("unknown-option", "aling=4096", None),
    ("missing-event", "set-state.0.new_state=2", None),
    # --- deliberate differences ---
    ("align-0", "align=0", "QEMU reads align=0 as not set; blkfuse asks you to leave it out"),
    (
        "max-transfer-0",
        "max-transfer=0",
        "QEMU reads max-transfer=0 as not set; blkfuse too asks to leave it out",
    ),
    (
        "quoted-value",
        'inject-error.0.event=read_aio,inject-error.0.errno="28"',
        "option values may carry config-file quotes in blkfuse",
    ),
]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("qemu") / "img.raw"
    path.write_bytes(bytes(65536))
    return path


def qemu_accepts(argv) -> bool:
    # `length` does no I/O, so a rule that fires cannot be mistaken for a refused config.
    result = subprocess.run(
        ["qemu-io", *argv, "-c", "length"], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        assert "can't open" in result.stderr, result.stderr
    return result.returncode == 0


def blkfuse_accepts(parse, *args) -> bool:
    try:
        parse(*args)
    except ConfigError:
        return False
    return True


def check_agreement(ours: bool, qemu: bool, difference: str | None):
    if difference is None:
        assert ours == qemu, f"blkfuse {'accepts' if ours else 'rejects'}, QEMU does not"
    else:
        assert ours != qemu, f"listed as a deliberate difference ({difference}) but both agree"


@pytest.mark.parametrize(
    "text, difference", [case[1:] for case in CONFIG_CASES], ids=[case[0] for case in CONFIG_CASES]
)
def test_config_file_verdict_matches_qemu(text, difference, image, tmp_path):
    conf = tmp_path / "blkdebug.conf"
    conf.write_text(text, newline="")
    qemu = qemu_accepts(["-f", "raw", f"blkdebug:{conf}:{image}"])
    check_agreement(blkfuse_accepts(parse_config_text, text), qemu, difference)


@pytest.mark.parametrize(
    "options, difference",
    [case[1:] for case in OPTION_CASES],
    ids=[case[0] for case in OPTION_CASES],
)
def test_option_verdict_matches_qemu(options, difference, image):
    prefixed = ",".join("file." + item for item in options.split(","))
    qemu = qemu_accepts(
        [
            "--image-opts",
            "driver=raw,file.driver=blkdebug,file.image.driver=file,"
            f"file.image.filename={image},{prefixed}",
        ]
    )
    ours = blkfuse_accepts(lambda s: parse_options(parse_option_string(s)), options)
    check_agreement(ours, qemu, difference)
