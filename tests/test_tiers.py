"""The test tiers hold: a test that starts a stack without the ``stack`` mark fails before anything starts (so
`make check` stays in-process), and tests on the shared stack fixtures are marked from them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INNER_CONFTEST = "from tests.conftest import *  # noqa: F403\nfrom tests.conftest import _stack_starts_are_marked  # noqa: F401\n"


@pytest.fixture()
def inner(pytester, monkeypatch):
    """A pytest run of its own with this suite's conftest (hooks, fixtures and the guard)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    pytester.makeconftest(INNER_CONFTEST)
    return pytester


def test_an_unmarked_test_that_starts_vbatch_up_fails_before_it_starts(inner):
    inner.makepyfile(test_unmarked="""
        from tests.conftest import start_up

        def test_starts_vbatch_up(tmp_path):
            start_up({"PATH": "/nonexistent"}, "--no-engine")
    """)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_starts_vbatch_up starts `vbatch up` but is not marked `stack`*"])


def test_an_unmarked_test_that_starts_a_vllm_engine_through_the_platform_fails(inner, tiny_model_path):
    inner.makepyfile(test_unmarked_engine=f"""
        from pathlib import Path

        from vbatch_pipelines.engine.vllm_server import ManagedVLLMServer, VLLMServerConfig
        from vbatch_pipelines.models.registry import ModelSpec

        def test_starts_an_engine(tmp_path):
            server = ManagedVLLMServer(ModelSpec("m", {str(tiny_model_path)!r}), tmp_path,
                                       VLLMServerConfig(python="/nonexistent/python", startup_timeout_s=1))
            server.ensure()
    """)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_starts_an_engine starts a vLLM server but is not marked `stack`*"])


def test_a_marked_test_may_start_one_and_the_shared_fixtures_mark_their_tests(inner):
    inner.makepyfile(test_tiers_inner="""
        import pytest

        from tests import tiers

        @pytest.mark.stack
        def test_marked():
            tiers.starting("a stack")

        def test_on_label_studio(label_studio_server):
            pass

        def test_on_a_fresh_database(postgres_url):
            pass

        def test_in_process():
            tiers.starting  # names it, starts nothing
    """)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not stack", "-k", "not fresh_database")
    result.assert_outcomes(passed=1, deselected=3)
    marked = inner.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--collect-only", "-m", "postgres")
    marked.stdout.fnmatch_lines(["*test_on_a_fresh_database*", "*1/4 tests collected (3 deselected)*"])
    inner.runpytest_subprocess("-p", "no:cacheprovider", "-k", "marked").assert_outcomes(passed=1)


def test_modules_on_one_shared_stack_run_on_one_worker_and_no_other_module_uses_it(inner):
    from tests import tiers

    api, prometheus = tiers.scope_of("tests/test_api.py::a"), tiers.scope_of("tests/test_prometheus.py::b[x]")
    assert api == prometheus == "default_stack" and tiers.scope_of("tests/test_vllm.py::c") == "tests/test_vllm.py"
    inner.makepyfile(test_elsewhere="""
        def test_on_the_default_stack(default_stack):
            pass
    """)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*uses default_stack: add test_elsewhere.py to tests/tiers.py SHARED_STACKS*"])
