"""azmlinfsrv's command line, run side by side with `scorehost serve` given the same one: the same script file is
served, and it sees the same Azure ML variables with the same values (AIHS 1.5.1's amlserver.py sets them before
gunicorn forks). Each server runs a script that answers with the variables it sees."""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import pytest

from corpus import Case, send
from scorehost import __version__, processes
from server.settings import read_as_off, resolve

GUID = "0c4a6b2e-1f3d-4a5b-9c8d-7e6f5a4b3c2d"
SEEN = ("AML_APP_ROOT", "AZUREML_ENTRY_SCRIPT", "AZUREML_MODEL_DIR", "WORKER_COUNT", "SERVER_PORT", "HEALTH_PORT",
        "AML_APP_INSIGHTS_ENABLED", "AML_APP_INSIGHTS_KEY", "HTTP_X_MS_SERVER_VERSION", "TRANSPORT_PROTOCOL",
        "AML_CORS_ORIGINS", "AZUREML_CONFIG_FILE")
ENV_DUMP = f"""import os


def init():
    pass


def run(data):
    return {{"file": __file__, **{{name: os.environ.get(name) for name in {SEEN!r}}}}}
"""
# What the test runner's own environment may carry, and either server would pass on or read.
OWN = ("AZUREML_", "AML_", "SCOREHOST_", "WORKER_", "SERVER_", "HEALTH_PORT", "SEPERATE_HEALTH_ENDPOINT",
       "HTTP_X_MS_SERVER_VERSION", "TRANSPORT_PROTOCOL", "APP_INSIGHTS_", "APPLICATIONINSIGHTS_")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    """raw/score.py, json/score.py, src/score.py (each answers with its own path) and cfg.json."""
    root = tmp_path_factory.mktemp("aihs-flags")
    for folder in ("raw", "json", "src"):
        (root / folder).mkdir()
        (root / folder / "score.py").write_text(ENV_DUMP)
    (root / "cfg.json").write_text(json.dumps({"AZUREML_MODEL_DIR": str(root / "raw"), "SCORING_TIMEOUT_MS": 60000}))
    return str(root)


class Pair:
    """Both servers given one command line (the program name swapped), environment and current directory."""

    def __init__(self, cwd: str, args: tuple[str, ...], env: dict[str, str], health: bool = False):
        self.servers: dict[str, processes.ServerProcess] = {}
        self.health: dict[str, int] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith(OWN)}
        for kind, program in (("scorehost", [processes._bin("scorehost"), "serve"]),
                              ("aihs", [processes._bin("azmlinfsrv")])):
            port = processes.free_port()
            own = list(args)
            if health:
                self.health[kind] = processes.free_port()
                own += ["--health_port", str(self.health[kind])]
            self.servers[kind] = processes.ServerProcess(kind, [*program, *own, "--port", str(port)],
                                                         {**base, "PYTHONUNBUFFERED": "1", **env}, port, cwd)

    def wait(self) -> "Pair":
        for server in self.servers.values():
            server.wait_healthy(60)
        return self

    def stop(self) -> None:
        processes.stop_all(self.servers.values())

    def seen(self, kind: str) -> dict[str, Optional[str]]:
        """What the script saw, ports and the server's own version in words (they differ by design)."""
        server = self.servers[kind]
        answer = send(server.url, Case("score.py", "POST", "/score", b"x"))
        assert answer.status == 200, answer
        seen = json.loads(answer.body)
        words = {str(server.port): "<port>", str(self.health.get(kind)): "<health port>",
                 f"scorehost/{__version__}": "<server version>", "azmlinfsrv/1.5.1": "<server version>"}
        return {name: words.get(value, value) if isinstance(value, str) else value for name, value in seen.items()}

    def both_see(self) -> dict[str, Optional[str]]:
        ours, theirs = self.seen("scorehost"), self.seen("aihs")
        assert ours == theirs
        return ours


@pytest.fixture(scope="module")
def pair(tree) -> Callable[[str], Pair]:
    """pair(name): one of the command lines below, both servers started on first use."""
    cases = {
        # the flag relative to the current directory, AML_APP_ROOT elsewhere
        "flag": (os.path.join(tree, "json"), ("--entry_script", "score.py", "--worker_count", "1"),
                 {"AML_APP_ROOT": os.path.join(tree, "raw")}, False),
        # a relative AML_APP_ROOT, the flag naming the script from the current directory; a model directory that is
        # not there; azmlinfsrv's hidden --rest
        "relative": (tree, ("--entry_script", "src/score.py", "--model_dir", "./nosuch", "--rest",
                            "--worker_count", "1"), {"AML_APP_ROOT": "src"}, False),
        # the script named by AZUREML_ENTRY_SCRIPT under AML_APP_ROOT, a config file with AZUREML_MODEL_DIR,
        # Application Insights asked for with "True", CORS origins, a separate health port
        "variables": (os.path.join(tree, "json"),
                      ("--config_file", "../cfg.json", "--worker_count", "1",
                       "--access_control_allow_origins", "http://a.example,http://b.example"),
                      {"AZUREML_ENTRY_SCRIPT": "score.py", "AML_APP_ROOT": os.path.join(tree, "raw"),
                       "AML_APP_INSIGHTS_ENABLED": "True", "AML_APP_INSIGHTS_KEY": GUID,
                       "SEPERATE_HEALTH_ENDPOINT": "true"}, True),
    }
    started: dict[str, Pair] = {}

    def get(name: str) -> Pair:
        if name not in started:
            cwd, args, env, health = cases[name]
            starting = Pair(cwd, args, env, health)
            try:
                started[name] = starting.wait()
            except BaseException:
                starting.stop()  # the one that did start
                raise
        return started[name]

    yield get
    for p in started.values():
        p.stop()


def test_the_entry_script_flag_is_found_from_the_current_directory(pair, tree):
    """`cd json && AML_APP_ROOT=../raw azmlinfsrv --entry_script score.py` serves json/score.py; scorehost served
    raw/score.py, and with a relative AML_APP_ROOT looked for src/src/score.py."""
    assert pair("flag").both_see()["file"] == os.path.join(tree, "json", "score.py")
    assert pair("relative").both_see()["file"] == os.path.join(tree, "src", "score.py")


def test_azureml_entry_script_is_found_under_the_app_root(pair, tree):
    assert pair("variables").both_see()["file"] == os.path.join(tree, "raw", "score.py")


def test_the_script_sees_azure_mls_variables(pair, tree):
    """The values azmlinfsrv exports (compared above server to server), spelled out here."""
    assert pair("flag").both_see() == {
        "file": os.path.join(tree, "json", "score.py"), "AML_APP_ROOT": os.path.join(tree, "raw"),
        "AZUREML_ENTRY_SCRIPT": os.path.join(tree, "json", "score.py"), "AZUREML_MODEL_DIR": None,
        "WORKER_COUNT": "1", "SERVER_PORT": "<port>", "HEALTH_PORT": "<port>", "AML_APP_INSIGHTS_ENABLED": "false",
        "AML_APP_INSIGHTS_KEY": None, "HTTP_X_MS_SERVER_VERSION": "<server version>", "TRANSPORT_PROTOCOL": "grpc",
        "AML_CORS_ORIGINS": None, "AZUREML_CONFIG_FILE": None}
    seen = pair("variables").both_see()
    assert (seen["AZUREML_ENTRY_SCRIPT"], seen["HEALTH_PORT"], seen["AML_CORS_ORIGINS"], seen["AML_APP_INSIGHTS_KEY"],
            seen["AZUREML_CONFIG_FILE"]) == ("score.py", "<health port>", "http://a.example,http://b.example", GUID,
                                             os.path.join(tree, "cfg.json"))


def test_a_model_dir_that_is_not_there_is_a_warning_and_passed_as_given(pair):
    """azmlinfsrv logs 'Model directory is not set or does not exist: ./nosuch' and serves; AZUREML_MODEL_DIR is
    the flag as given, relative to the current directory (scorehost's workers never change directory)."""
    p = pair("relative")
    seen = p.both_see()
    assert (seen["AZUREML_MODEL_DIR"], seen["AML_APP_ROOT"]) == ("./nosuch", "src")
    assert "./nosuch is not a directory" in p.servers["scorehost"].output()


def test_rest_is_accepted_and_only_names_the_transport(pair):
    assert pair("relative").both_see()["TRANSPORT_PROTOCOL"] == "rest"


def test_application_insights_is_enabled_by_exactly_true(pair):
    """azmlinfsrv compares AML_APP_INSIGHTS_ENABLED with "true": "True" leaves Application Insights off."""
    assert not resolve({}, {"AML_APP_INSIGHTS_ENABLED": "True", "AML_APP_ROOT": "/nonexistent"}).appinsights_enabled
    assert resolve({}, {"AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_ROOT": "/nonexistent"}).appinsights_enabled
    assert pair("variables").both_see()["AML_APP_INSIGHTS_ENABLED"] == "false"
    output = pair("variables").servers["scorehost"].output()
    assert "appinsights_enabled: False" in output and "AML_APP_INSIGHTS_ENABLED=True is off: azmlinfsrv reads it so" in output


@pytest.mark.parametrize("variable, name, on", [
    ("AML_APP_INSIGHTS_ENABLED", "appinsights_enabled", ("true",)),
    ("SEPERATE_HEALTH_ENDPOINT", "separate_health_endpoint", ("true",)),
    ("SERVER_VERSION_LOG_RESPONSE_ENABLED", "server_version_header", ("true", "True", "TRUE"))])
def test_azmlinfsrvs_variables_read_as_it_reads_them_and_scorehosts_flags_as_booleans(variable, name, on):
    """amlserver.py compares AML_APP_INSIGHTS_ENABLED and SEPERATE_HEALTH_ENDPOINT with "true", and
    SERVER_VERSION_LOG_RESPONSE_ENABLED's lower() with "true": anything else is off, without an error (scorehost
    read "1" and "yes" as on). The flags are scorehost's own: `--appinsights-enabled 1` was silently off."""
    import argparse

    from server.settings import add_arguments

    for text in ("true", "True", "TRUE", "1", "yes", "on", "false", "0", "junk"):
        assert resolve({}, {variable: text, "AML_APP_ROOT": "/nonexistent"}).values[name] is (text in on), text
    assert read_as_off({}, {variable: "1"}) == [f"scorehost: {variable}=1 is off: azmlinfsrv reads it so (see --help), "
                                                "and so does scorehost"]
    assert read_as_off({name: True}, {variable: "1"}) == read_as_off({}, {variable: "false"}) == []
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flag = "--" + name.replace("_", "-")
    for text, value in (("1", True), ("yes", True), ("True", True), ("false", False), ("0", False)):
        assert getattr(parser.parse_args([flag, text]), name) is value
    with pytest.raises(SystemExit):
        parser.parse_args([flag, "junk"])


def test_a_config_files_model_dir_is_not_exported_to_the_script(pair):
    """azmlinfsrv's config file configures the server only: a script that reads AZUREML_MODEL_DIR fails there."""
    assert pair("variables").both_see()["AZUREML_MODEL_DIR"] is None


def test_cors_headers_on_a_request_without_origin(pair):
    """flask-cors sends a literal origin (the first) with `Vary: Origin` to a request without Origin, and never a
    compiled pattern: scorehost compiled every origin, so it sent neither. Only those with pattern characters are."""
    p = pair("variables")
    answers = {kind: send(s.url, Case("score.py", "POST", "/score", b"x")) for kind, s in p.servers.items()}
    assert answers["aihs"].header("access-control-allow-origin") == "http://a.example"
    assert [answers["scorehost"].header(name) for name in ("access-control-allow-origin", "vary")] == \
        [answers["aihs"].header(name) for name in ("access-control-allow-origin", "vary")]


def test_the_banner_says_debugging_runs_one_worker(tree):
    port = processes.free_port()
    with processes.running("scorehost", os.path.join(tree, "raw", "score.py"), workers=2,
                           extra_args=("--debug-port", str(port))) as server:
        output = server.output()
        assert "Mode: per worker: 1 worker(s)" in output and "2 worker(s)" not in output
        assert "Debugging (AZUREML_DEBUG_PORT / --debug-port" in output
        assert json.loads(send(server.url, Case("score.py", "POST", "/score", b"x")).body)["WORKER_COUNT"] == "1"
