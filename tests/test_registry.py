"""Registry behaviour: lazy listing, short names, clear errors (unknown, duplicate, broken plugin)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from retrieval_lightning.head import Head
from retrieval_lightning.registry import DATAMODULES, HEADS, PluginError, Registry, describe_plugins


def make_distribution(root: Path, dist: str, module: str, source: str, heads: dict[str, str]) -> None:
    """A minimal installed distribution: a module plus a .dist-info with entry points."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = "\n".join(f"{name} = {target}" for name, target in heads.items())
    (info / "entry_points.txt").write_text(f"[retrieval_lightning.heads]\n{lines}\n")


@pytest.fixture
def extra_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def fresh_heads() -> Registry:
    return Registry(HEADS.group, "head", "retrieval_lightning.head_plugins", HEADS._check)


def test_builtin_plugins_are_registered() -> None:
    assert "gem_arcface" in HEADS.names()
    assert {"minilandmarks", "gldv2", "revisitop"} <= set(DATAMODULES.names())
    entry = HEADS.entry("gem_arcface")
    assert entry.distribution == "retrieval-lightning"
    assert issubclass(HEADS.get("gem_arcface"), Head)


def test_listing_imports_nothing(extra_path: Path) -> None:
    make_distribution(extra_path, "lazy-dist", "lazy_head_mod", "raise RuntimeError('imported!')\n",
                      {"lazy_head": "lazy_head_mod:X"})
    registry = fresh_heads()
    assert "lazy_head" in registry.names()
    assert "lazy_head_mod" not in sys.modules


def test_unknown_name_lists_and_suggests() -> None:
    with pytest.raises(PluginError) as err:
        HEADS.get("gem_arcfce")
    msg = str(err.value)
    assert "did you mean 'gem_arcface'" in msg and "gem_arcface" in msg and "retrieval_lightning.heads" in msg


def test_duplicate_name_across_distributions_names_both(extra_path: Path) -> None:
    make_distribution(extra_path, "first-dist", "dup_a", "X = 1\n", {"twin": "dup_a:X"})
    make_distribution(extra_path, "second-dist", "dup_b", "X = 2\n", {"twin": "dup_b:X"})
    heads = fresh_heads()
    assert "twin" in heads.names() and heads.get("gem_arcface")  # a clash stops only what uses the name
    with pytest.raises(PluginError) as err:
        heads.get("twin")
    assert "first-dist" in str(err.value) and "second-dist" in str(err.value) and "twin" in str(err.value)
    assert set(heads.clashes()) == {"twin"}


def test_import_failure_names_plugin_distribution_and_cause(extra_path: Path) -> None:
    make_distribution(extra_path, "broken-dist", "broken_head_mod", "import not_a_real_module_xyz\n",
                      {"broken": "broken_head_mod:Head"})
    with pytest.raises(PluginError) as err:
        fresh_heads().get("broken")
    msg = str(err.value)
    assert "'broken'" in msg and "broken-dist" in msg and "not_a_real_module_xyz" in msg


def test_non_head_class_is_rejected(extra_path: Path) -> None:
    make_distribution(extra_path, "wrong-dist", "wrong_head_mod", "class NotAHead: pass\n",
                      {"wrong": "wrong_head_mod:NotAHead"})
    with pytest.raises(PluginError, match="not a subclass of retrieval_lightning.head.Head"):
        fresh_heads().get("wrong")


@pytest.mark.parametrize(("source", "message"), [
    ("from retrieval_lightning.head import Head\nclass H(Head):\n    role = 'verifier'\n",
     "role 'verifier' but is not a subclass of retrieval_lightning.head.RerankHead"),
    ("from retrieval_lightning.head import GlobalHead\nclass H(GlobalHead):\n    def _build(self, c, n): pass\n",
     r"H \(role 'global'\) does not implement dim, embed"),
    ("from retrieval_lightning.head import VerifierHead\nclass H(VerifierHead):\n    def entry_kinds(self): return {}\n",
     "does not implement _build, extract_entries, score"),
    ("from retrieval_lightning.head import VerifierHead\nclass H(VerifierHead):\n    role = 'local'\n",
     "H subclasses retrieval_lightning.head.VerifierHead but declares role 'local'"),
])
def test_a_head_that_cannot_serve_its_role_is_refused_when_loaded(extra_path: Path, source: str, message: str) -> None:
    """A verifier that is a plain Head would be built and never re-rank; a missing method would fail
    hours later (after training) with a bare NotImplementedError."""
    module = f"half_head_mod_{abs(hash(source))}"  # one module per case: an imported module is cached
    make_distribution(extra_path, "half-dist", module, source, {"half": f"{module}:H"})
    with pytest.raises(PluginError, match=message):
        fresh_heads().get("half")


def test_alias_is_importable_by_short_name() -> None:
    import retrieval_lightning.head_plugins as aliases

    alias = aliases.gem_arcface
    assert alias.__name__ == "gem_arcface"
    assert issubclass(alias, HEADS.get("gem_arcface"))
    assert aliases.gem_arcface is alias
    with pytest.raises(PluginError, match="unknown head"):
        getattr(aliases, "no_such_head")


def test_alias_modules_answer_hasattr_for_unknown_names() -> None:
    import retrieval_lightning.datamodule_plugins as data_aliases
    import retrieval_lightning.head_plugins as head_aliases

    assert hasattr(head_aliases, "gem_arcface") and hasattr(data_aliases, "minilandmarks")
    assert not hasattr(head_aliases, "no_such_head") and not hasattr(data_aliases, "no_such_data")
    assert getattr(head_aliases, "no_such_head", None) is None
    with pytest.raises(AttributeError, match="did you mean 'gem_arcface'"):
        head_aliases.gem_arcfce


def test_alias_of_a_broken_plugin_is_not_mistaken_for_a_missing_name(extra_path: Path) -> None:
    import retrieval_lightning.head_plugins as aliases

    make_distribution(extra_path, "broken-alias-dist", "broken_alias_mod", "import not_a_real_module_xyz\n",
                      {"broken_alias": "broken_alias_mod:Head"})
    with pytest.raises(PluginError, match="failed to import") as err:
        hasattr(aliases, "broken_alias")
    assert not isinstance(err.value, AttributeError)


def test_an_entry_point_target_not_of_the_form_module_attr_is_named_so(extra_path: Path) -> None:
    """``module Class`` (a space for the colon) was reported as a failed import of an AttributeError from
    inside importlib's own parsing."""
    make_distribution(extra_path, "spaced-dist", "spaced_mod", "class Head: pass\n", {"spaced": "spaced_mod Head"})
    with pytest.raises(PluginError, match=r"'spaced' from distribution spaced-dist 1.2.3: its entry-point target "
                                          r"'spaced_mod Head' is not of the form module:attribute"):
        fresh_heads().get("spaced")


def test_a_command_naming_a_broken_plugin_stops_with_its_import_error(extra_path: Path) -> None:
    """The registry's reason (the plugin, its distribution, the import error) in one line, exit 2: not a
    warning followed by the parser's "expected a dot import path" and its usage text."""
    from helpers import run_main

    make_distribution(extra_path, "broken-cli-dist", "broken_cli_mod", "import not_a_real_module_xyz\n",
                      {"broken_cli": "broken_cli_mod:Head"})
    done = run_main(["test", "--model.heads.global.class_path=broken_cli"], cwd=extra_path, status=2)
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error: head plugin 'broken_cli'") and "not_a_real_module_xyz" in lines[0]
    assert "usage:" not in done.stderr


def test_describe_plugins_reports_role_and_distribution() -> None:
    rows = {(r["kind"], r["name"]): r for r in describe_plugins()}
    assert rows[("head", "gem_arcface")]["role"] == "global"
    assert rows[("datamodule", "gldv2")]["distribution"] == "retrieval-lightning"
