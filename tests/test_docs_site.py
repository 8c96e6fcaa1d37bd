"""The documentation site: every code block runs in a test or is marked as a fragment, the
pages without a runner of their own run here, and the generated reference covers the code.

A fragment is a block preceded by the line ``<!-- fragment -->`` (invisible on the site and on
GitHub; ``<!-- fragment: why -->`` may say more): an illustration that no test runs, such as a
shell session that installs packages.
Every other block must be run by the test that ``RUNNERS`` names for its page and language.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(
    r"^(?P<fragment><!-- fragment[^\n]*-->\n)?```(?P<lang>[^\n`]*)\n(?P<code>.*?)^```$", re.M | re.S
)
PAGES = sorted([*ROOT.glob("docs/**/*.md"), ROOT / "README.md", *ROOT.glob("packages/*/README.md")])

# (page, language) -> (the test that runs those blocks, which of them it runs): "all", "file"
# (those whose first line is "# file: NAME"), or "one" (it runs the page's only such block).
RUNNERS: dict[tuple[str, str], tuple[str, str]] = {
    ("README.md", "python"): ("tests/core/test_readme.py", "all"),
    ("docs/index.md", "python"): ("tests/test_docs_site.py", "all"),
    ("docs/coming-from-qtasks.md", "python"): (
        "tests/compat/test_coming_from_qtasks_doc.py",
        "all",
    ),
    ("docs/from-celery.md", "python"): ("tests/test_docs_site.py", "all"),
    ("docs/flow-control.md", "python"): ("tests/test_docs_site.py", "all"),
    ("docs/tasks.md", "python"): ("tests/core/test_docs_tasks.py", "all"),
    ("docs/workflows.md", "python"): ("tests/test_docs_site.py", "all"),
    ("docs/context.md", "python"): ("tests/core/test_context_docs.py", "all"),
    ("docs/state.md", "python"): ("tests/core/test_context_docs.py", "all"),
    ("docs/depends.md", "python"): ("tests/core/test_context_docs.py", "all"),
    ("docs/generators.md", "python"): ("tests/core/test_context_docs.py", "all"),
    ("docs/plugins.md", "python"): ("tests/core/test_plugins_docs.py", "all"),
    ("docs/configuration.md", "python"): ("tests/core/test_plugins_docs.py", "all"),
    ("docs/configuration.md", "toml"): ("tests/core/test_plugins_docs.py", "file"),
    ("docs/cli.md", "python"): ("tests/core/test_plugins_docs.py", "all"),
    # `qtasks run` lines: tests/core/test_cli_run.py; "# with Redis" blocks: test_redis_cli.py.
    ("docs/cli.md", "console"): ("tests/core/test_plugins_docs.py", "all"),
    ("docs/testing.md", "python"): ("tests/testing/test_docs_testing.py", "file"),
    ("docs/testing.md", "ini"): ("tests/testing/test_docs_testing.py", "file"),
    ("docs/redis.md", "python"): ("tests/redis/test_redis_app.py", "one"),
    ("docs/rabbitmq.md", "python"): ("tests/rabbitmq/test_docs.py", "one"),
    ("docs/timers.md", "python"): ("tests/timer/test_timer_docs.py", "one"),
    ("docs/web.md", "python"): ("tests/test_docs_site.py", "all"),
    ("docs/metrics-and-tracing.md", "python"): ("tests/web/test_metrics_docs.py", "all"),
    ("docs/metrics-and-tracing.md", "toml"): ("tests/web/test_metrics_docs.py", "file"),
    ("packages/qtasks-core/README.md", "python"): ("tests/test_release.py", "one"),
    ("packages/qtasks-timer/README.md", "python"): ("tests/test_release.py", "one"),
    ("packages/qtasks-testing/README.md", "python"): ("tests/test_release.py", "one"),
    ("packages/qtasks-web/README.md", "python"): ("tests/test_release.py", "one"),
    ("packages/qtasks-redis/README.md", "python"): ("tests/redis/test_redis_readme.py", "one"),
    ("packages/qtasks-rabbitmq/README.md", "python"): ("tests/rabbitmq/test_docs.py", "one"),
}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    fragment: bool


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a page (the fence at the start of a line, as all pages write it)."""
    text = path.read_text()
    page = path.relative_to(ROOT).as_posix()
    return [
        Block(
            page,
            text.count("\n", 0, m.start("lang")) + 1,
            m.group("lang").strip(),
            m.group("code"),
            bool(m.group("fragment")),
        )
        for m in FENCE.finditer(text)
    ]


def test_every_block_runs_or_is_a_fragment() -> None:
    unaccounted = []
    for path in PAGES:
        found = blocks(path)
        assert path.read_text().count("```") == 2 * len(found), f"{path}: a fence was not parsed"
        for block in found:
            if block.fragment:
                continue
            runner = RUNNERS.get((block.page, block.lang))
            if runner is None:
                unaccounted.append(f"{block.page}:{block.line} ({block.lang or 'no language'})")
            elif runner[1] == "file" and not block.code.startswith("# file: "):
                unaccounted.append(f"{block.page}:{block.line} (no '# file: ' line)")
    assert not unaccounted, (
        "blocks no test runs; run them or mark them <!-- fragment -->:\n" + "\n".join(unaccounted)
    )


@pytest.mark.parametrize(("page", "lang"), sorted(RUNNERS))
def test_runners_are_real(page: str, lang: str) -> None:
    runner, which = RUNNERS[(page, lang)]
    source = (ROOT / runner).read_text()
    assert Path(page).name in source or Path(page).parent.name in source, (runner, page)
    running = [b for b in blocks(ROOT / page) if b.lang == lang and not b.fragment]
    assert running, f"{page} has no {lang} block to run"
    if which == "one":
        assert len(running) == 1, f"{runner} runs one {lang} block of {page}"


def self_run_blocks() -> list[Block]:
    return [
        block
        for (page, lang), (runner, _) in sorted(RUNNERS.items())
        if runner == "tests/test_docs_site.py"
        for block in blocks(ROOT / page)
        if block.lang == lang and not block.fragment
    ]


@pytest.mark.parametrize("block", self_run_blocks(), ids=lambda b: f"{b.page}:{b.line}")
def test_page_example_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for promised in re.findall(r"print\(.*\)  # (.+)$", block.code, flags=re.M):
        assert promised in done.stdout, (promised, done.stdout)


def test_from_celery_maps_the_canvas_to_the_workflows_qtasks_has() -> None:
    """docs/from-celery.md said canvas had "no equivalent", though qtasks ships chain, group,
    chord and map (review r15 #11): each name the row gives is real."""
    import qtasks
    from qtasks.task import TaskDef

    page = (ROOT / "docs" / "from-celery.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| canvas"))
    ours = row.split(") | ", 1)[1]
    assert "no equivalent" not in ours
    for name in ("chain", "group", "chord"):
        assert f"`{name}`" in ours and callable(getattr(qtasks, name))
    for method in ("s", "si", "map"):
        assert f".{method}(" in ours and callable(getattr(TaskDef, method))
    assert "app.run_workflow(" in ours and callable(qtasks.QueueTasks.run_workflow)
    assert "](workflows.md)" in ours


def test_every_page_is_in_the_nav() -> None:
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in ROOT.glob("docs/**/*.md")}
    assert nav == pages


def test_every_hook_states_its_kind_and_is_in_the_reference() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import mkdocs_hooks
    finally:
        sys.path.remove(str(ROOT))
    from qtasks import hookspecs

    rows = mkdocs_hooks.hook_rows()
    names = {name for name, _, _ in rows}
    assert names == {n for n in vars(hookspecs) if n.startswith("qtasks_")}
    for name, kind, params in rows:
        func = getattr(hookspecs, name)
        assert kind in ("notification", "transform", "decide"), f"{name}: docstring states no kind"
        firstresult = bool(getattr(func, "qtasks_spec", {}).get("firstresult"))
        assert firstresult == (kind == "decide"), name
        assert params == list(inspect.signature(func).parameters)
    table = mkdocs_hooks.hooks_table()
    assert all(f"[`{name}`]" in table for name in names)
    reference = (ROOT / "docs" / "reference" / "hooks.md").read_text()
    assert mkdocs_hooks.HOOKS_MARKER in reference and "::: qtasks.hookspecs" in reference


def test_the_cli_reference_has_every_builtin_command() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import mkdocs_hooks
    finally:
        sys.path.remove(str(ROOT))
    paths = {path for path, _, _ in mkdocs_hooks.cli_commands()}
    assert paths == {
        "qtasks",
        *(
            f"qtasks {c}"
            for c in ("run", "add", "get", "cancel", "inspect", "plugins", "config", "workflow")
        ),
        "qtasks dlq",
        "qtasks dlq list",
        "qtasks dlq requeue",
        "qtasks stats",  # QTasks' `qtasks stats inspect` (docs/coming-from-qtasks.md)
        "qtasks stats inspect",
    }  # and not `qtasks audit`: the test plugin installed here is no user's
    text = mkdocs_hooks.cli_reference()
    assert "| `--concurrency" in text  # the metavar after it differs between typer versions
    assert mkdocs_hooks.CLI_MARKER in (ROOT / "docs" / "reference" / "cli.md").read_text()
