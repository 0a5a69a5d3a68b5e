"""
The man pages and docs/reference.md are what L{shifter.admin.manpage}
writes from the option definitions (so they cannot drift from the
program), and C{groff} renders the pages without a warning.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from shifter.admin import manpage
from shifter.admin.command import check
from shifter.service.tap import Options

DOCS = Path(__file__).resolve().parent.parent / "docs"


class GeneratedTests(SynchronousTestCase):
    def test_committedEqualGenerated(self) -> None:
        """
        Every generated file under docs/ is, byte for byte, what the
        generator writes now; make man rewrites them.
        """
        for name, make in manpage.GENERATED.items():
            committed = (DOCS / name).read_text()
            self.assertEqual(committed, make(), f"docs/{name} differs from the generator's output: run make man")

    def test_everyOptionDocumented(self) -> None:
        """
        Every option an operator gives is in shifter(8), shifter.toml(5)
        (but --config) and the reference, with its default.
        """
        page, config, reference = manpage.shifter8(), manpage.shifterToml5(), manpage.reference()
        names = [spec.rstrip("=") for spec in Options().longOpt if spec.rstrip("=") not in ("worker", "help", "version")]
        self.assertIn("idle-timeout", names)
        for name in names:
            self.assertIn("\\fB\\-\\-" + name.replace("-", "\\-") + "\\fR", page)
            self.assertIn(f"`--{name}`", reference)
            if name != "config":
                self.assertIn("\\fB" + name.replace("-", "\\-") + "\\fR", config)
        self.assertIn("Default: 3600.0.", page.replace("\\-", "-").split("idle-timeout")[1])

    def test_commands(self) -> None:
        """
        shifter(8) names each command of shifter.
        """
        page = manpage.shifter8()
        for command in ("run", "check", "rules", "ctl", "doctor", "kmod"):
            self.assertIn(f".TP\n\\fB{command}\\fR\n", page)

    def test_exampleChecks(self) -> None:
        """
        shifter.toml(5)'s example is a file shifter check accepts, and is
        in the page.
        """
        path = Path(self.mktemp())
        path.write_text(manpage.EXAMPLE)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(check(["--config", str(path)], out, err), 0, err.getvalue())
        self.assertIn("1 proxy", out.getvalue())
        self.assertIn("1 rule", out.getvalue())
        self.assertIn(manpage.roffText(manpage.EXAMPLE.rstrip("\n")), manpage.shifterToml5())

    def test_undescribedKey(self) -> None:
        """
        A configuration key with no description stops the generator.
        """
        self.patch(manpage, "_RULE_KEYS", manpage._RULE_KEYS + ("colour",))
        self.assertRaises(KeyError, manpage.reference)

    def test_noStaleDescription(self) -> None:
        """
        Every key described is a key the file reader knows, and every
        [gateway] key has the doctor's option to describe it.
        """
        self.assertEqual(set(manpage.PROXY_KEY_HELP), set(manpage._PROXY_KEYS))
        self.assertEqual(set(manpage.RULE_KEY_HELP), set(manpage._RULE_KEYS))
        self.assertEqual(set(manpage.gatewayKeyHelp()), set(manpage.GATEWAY_KEYS))

    def test_escape(self) -> None:
        """
        Backslashes, hyphens and a leading dot or quote cannot be taken
        for roff requests or escapes.
        """
        self.assertEqual(manpage.roffText("a\\:b-c"), "a\\e:b\\-c")
        self.assertEqual(manpage.roffText(".TH x\n'br"), "\\&.TH x\n\\&'br")


class RenderTests(SynchronousTestCase):
    def test_groffWarnsNothing(self) -> None:
        """
        groff renders both pages with every warning on and says nothing.
        """
        if shutil.which("groff") is None:
            raise self.failureException("groff is missing: apt-get install groff-base (make apt)")
        for name in ("man/shifter.8", "man/shifter.toml.5"):
            result = subprocess.run(
                ["groff", "-man", "-Tutf8", "-ww", "-z", str(DOCS / name)],
                capture_output=True, text=True, timeout=60, env={**os.environ, "LC_ALL": "C.UTF-8"},
            )
            self.assertEqual((result.returncode, result.stderr), (0, ""), name)

    def test_manRenders(self) -> None:
        """
        man -l shows shifter(8) with its sections and warns of nothing.
        """
        if shutil.which("man") is None:
            raise self.failureException("man is missing: apt-get install man-db (make apt)")
        result = subprocess.run(
            ["man", "-l", str(DOCS / "man/shifter.8")],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_STDERR": "1", "MANPAGER": "cat", "PAGER": "cat"},
        )
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        for section in ("NAME", "SYNOPSIS", "COMMANDS", "OPTIONS"):
            self.assertIn(f"\n{section}\n", result.stdout)
