"""The seed of each cut a powercut rule fires (crash/undo.py rule_cut_seed), as README
"Power cuts" documents it: the mount's seed for the first, then a hash a shell can redo."""

import subprocess

from blkfuse.crash.undo import rule_cut_seed


def test_the_first_rule_cut_uses_the_mount_seed_itself():
    for seed in (0, 7, 1234, 2**32 - 1, 2**40):
        assert rule_cut_seed(seed, 0) == seed


def test_later_cuts_follow_the_readme_shell_recipe_and_differ_from_each_other():
    for seed, ordinal in ((7, 1), (7, 2), (1234, 1), (0, 5)):
        text = f"{seed}:cut:{ordinal}"
        shell = subprocess.run(
            ["sh", "-c", f"printf {text} | sha256sum | cut -c1-8"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert rule_cut_seed(seed, ordinal) == int(shell, 16)
    seeds = [rule_cut_seed(7, n) for n in range(50)]
    assert len(set(seeds)) == 50 and all(0 <= s < 2**32 for s in seeds[1:])
