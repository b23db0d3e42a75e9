import ast
import json
import os
import resource
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One intra-op thread in this process and the processes it starts (read when torch is first
# imported, which comes after this file): the tests' tensors are tiny, and on a busy 2-core
# machine a second OpenMP thread per process spins at every operation (a tiny training run
# took 25 s of CPU with it, 1 s without).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-durations",
        type=int,
        default=None,
        metavar="N",
        help="show the N tests that used the most CPU time (this process and its finished children): "
        "on a shared machine a steadier measure than --durations",
    )


_CPU = {}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = _cpu_seconds()
    yield
    _CPU[item.nodeid] = _cpu_seconds() - start


def pytest_terminal_summary(terminalreporter, config):
    n = config.getoption("--cpu-durations")
    if n is None or not _CPU:
        return
    terminalreporter.write_sep("=", f"{n} largest CPU times (setup + call + teardown)")
    for nodeid, seconds in sorted(_CPU.items(), key=lambda kv: -kv[1])[: n or None]:
        terminalreporter.write_line(f"{seconds:8.2f}s  {nodeid}")
    terminalreporter.write_line(f"{sum(_CPU.values()):8.2f}s  CPU in all {len(_CPU)} tests")


@pytest.fixture(autouse=True)
def shared_models_unchanged():
    """The models tests/inference_models.py shares between tests stay as built."""
    yield
    models = sys.modules.get("tests.inference_models")
    changed = models.changed_shared_models() if models is not None else []
    assert not changed, f"this test changed a shared model (use fresh_model): {changed[:5]}"


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A test (or what it runs in this process, a server's serve() say) leaves SIGINT and
    SIGTERM as it found them: a handler left behind would swallow the next Ctrl+C."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    left = {sig.name: signal.getsignal(sig) for sig, handler in before.items() if signal.getsignal(sig) is not handler}
    for sig, handler in before.items():
        signal.signal(sig, handler)
    assert not left, f"this test left signal handlers installed: {left}"


@pytest.fixture(scope="session")
def dist1():
    """A single-process world with megatron-core's parallel state (TP=PP=DP=1)."""
    import megatron.early_exit  # noqa: F401

    # isort: split
    from megatron.early_exit.parallel import initialize_parallel

    return initialize_parallel(1, 1)


def case_names(module_name: str):
    """`case_*` functions of a multi-process case module, read without importing it."""
    path = os.path.join(ROOT, *module_name.split(".")) + ".py"
    tree = ast.parse(open(path).read())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("case_")]


_LAUNCHES = {}


def launch(module_name: str, nproc: int, tmp_dir: str, timeout: int = 900, env: dict | None = None):
    """Run every case of `module_name` in one torchrun launch of its own (cached per session);
    modules that need no more than the corpus run grouped instead (`launch_grouped`)."""
    key = (module_name, nproc, tuple(sorted((env or {}).items())))  # other inputs: another launch
    if key not in _LAUNCHES:
        out = os.path.join(tmp_dir, f"{module_name.replace('.', '_')}_{nproc}_{len(_LAUNCHES)}.json")
        _LAUNCHES[key] = _torchrun([module_name], out, nproc, timeout, env or {})
    proc, results = _LAUNCHES[key]
    if results is None:
        _launch_failed(module_name, proc)
    return results


# Case modules that run together: all those of one size (processes) in one torchrun launch,
# since importing megatron-core costs each process ~8 s. A module is launched when a selected
# test uses its results (through the named fixture of the named test file, or as test_multiproc's
# parameter); its cases read EE_TEST_DATA (the session's corpus, where marked) and EE_TEST_OUT
# (a folder of its own, `case_output_dir`), where the fixtures of PREPARE put their inputs first.
GROUPED = {  # module: (processes, test file, fixture, needs the corpus)
    "tests.multiproc.cases_foundation": (2, "test_multiproc.py", None, False),
    "tests.multiproc.cases_model": (2, "test_multiproc.py", None, False),
    "tests.multiproc.cases_inference": (2, "test_multiproc.py", None, False),
    "tests.multiproc.cases_inference_pipeline": (2, "test_multiproc.py", None, False),
    "tests.multiproc.cases_engine": (2, "test_multiproc.py", None, False),
    "tests.multiproc.cases_te_layout": (2, "test_multiproc.py", None, False),
    "tests.multiproc.cases_checkpoint": (2, "test_checkpoint.py", "checkpoint_runs", True),
    "tests.multiproc.cases_ee_tuning_stages": (2, "test_ee_tuning_stages.py", "runs", True),
    "tests.multiproc.cases_recompute": (2, "test_recompute.py", "recompute_runs", True),
    "tests.multiproc.cases_training": (2, "test_training.py", "two_process_runs", True),
    "tests.test_scoring": (2, "test_scoring.py", "scoring_runs", False),
    "tests.test_evaluate": (2, "test_evaluate.py", "evaluate_runs", False),
    "tests.multiproc.cases_pipeline": (4, "test_multiproc.py", None, False),
    "tests.multiproc.cases_pipeline_training": (4, "test_pipeline.py", "pipeline_runs", True),
    "tests.multiproc.cases_interleaved": (4, "test_interleaved.py", "interleaved_runs", True),
    "tests.multiproc.cases_reshard": (4, "test_checkpoint.py", "reshard_runs", True),
    "tests.multiproc.cases_hf": (4, "test_hf.py", "hf_tp2_pp2_runs", False),
}
# module: session fixture that writes its inputs first (and returns more environment, or None)
PREPARE = {
    "tests.multiproc.cases_reshard": "reshard_inputs",
    "tests.multiproc.cases_hf": "hf_tp2_pp2_inputs",
    "tests.test_evaluate": "evaluate_launch_env",
}


def pytest_itemcollected(item):
    """make test runs two pytest-xdist workers (--dist loadgroup): every test that starts
    torchrun, or reads a grouped launch's results, stays on one of them, so that each launch
    runs once and the launches (which use both cores) never overlap. Marked as each test is
    collected: xdist reads the groups in its own pytest_collection_modifyitems."""
    if item.get_closest_marker("multiproc") or any(_uses(item, m) for m in GROUPED):
        item.add_marker(pytest.mark.xdist_group("torchrun"))


def pytest_runtest_setup(item):
    """Under --dist loadgroup a grouped test carries its group in its id; a pytest/xdist pair that
    stopped grouping (as pytest 9.2 with xdist 3.8 does) would run each launch on both workers."""
    if getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group"):
        if not item.nodeid.endswith("@torchrun"):
            pytest.fail(f"pytest-xdist did not group {item.nodeid} (check the pytest and pytest-xdist versions)")


def _uses(item, module_name) -> bool:
    _, test_file, fixture, _ = GROUPED[module_name]
    if os.path.basename(str(item.fspath)) != test_file:
        return False
    if fixture is None:
        return getattr(getattr(item, "callspec", None), "params", {}).get("module") == module_name
    return fixture in item.fixturenames


def case_output_dir(request, module_name: str) -> str:
    """The folder a grouped module's cases write to (their EE_TEST_OUT)."""
    path = os.path.join(request.getfixturevalue("launch_dir"), module_name.rsplit(".", 1)[-1])
    os.makedirs(path, exist_ok=True)
    return path


def launch_grouped(module_name: str, request) -> dict:
    """The results of `module_name`'s cases, from the one launch of the modules of its size
    that the selected tests use (run at the first call, then cached). A module that launch
    left out (its users were not recognised) gets a launch of its own."""
    nproc = GROUPED[module_name][0]
    launched = [entry for key, entry in _LAUNCHES.items() if key[0] == "group" and key[1] == nproc]
    if not any(module_name in members for members, _ in launched):
        if launched:
            members = [module_name]
        else:
            members = [
                m
                for m, (n, *_) in GROUPED.items()
                if n == nproc and (m == module_name or any(_uses(item, m) for item in request.session.items))
            ]
        corpus = request.getfixturevalue("corpus") if any(GROUPED[m][3] for m in members) else None
        prepared = {m: request.getfixturevalue(PREPARE[m]) if m in PREPARE else None for m in members}
        group = [
            {
                "module": m,
                "env": {
                    "EE_TEST_OUT": case_output_dir(request, m),
                    **({"EE_TEST_DATA": corpus} if GROUPED[m][3] else {}),
                    **(prepared[m] if isinstance(prepared[m], dict) else {}),
                },
            }
            for m in members
        ]
        launch_dir = request.getfixturevalue("launch_dir")
        name = f"group_{nproc}_{len(launched)}"
        with open(os.path.join(launch_dir, f"{name}.json"), "w") as f:
            json.dump(group, f)
        _LAUNCHES[("group", nproc, len(launched))] = (
            members,
            _torchrun(
                ["--group", os.path.join(launch_dir, f"{name}.json")],
                os.path.join(launch_dir, f"{name}_results.json"),
                nproc,
                timeout=600 * len(members),
                env={},
            ),
        )
        launched = [entry for key, entry in _LAUNCHES.items() if key[0] == "group" and key[1] == nproc]
    ((proc, results),) = [outcome for members, outcome in launched if module_name in members]
    if results is None or module_name not in results:
        _launch_failed(module_name, proc)
    return results[module_name]


def _launch_failed(module_name, proc):
    pytest.fail(
        f"torchrun launch of {module_name} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )


def _torchrun(runner_args, out, nproc, timeout, env):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        os.path.join(ROOT, "tests", "multiproc", "runner.py"),
        *runner_args,
        out,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **env)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, (json.load(open(out)) if os.path.exists(out) else None)


@pytest.fixture(scope="session")
def launch_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("launches"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A preprocessed, learnable NullTokenizer corpus (prefix of its .bin/.idx)."""
    from tests.training_fixtures import write_corpus

    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="session")
def server_checkpoint(dist1, tmp_path_factory):
    """tests/server_fixtures.py's tiny checkpoint, written once."""
    from tests.server_fixtures import write_checkpoint

    root = str(tmp_path_factory.mktemp("server_ckpt"))
    write_checkpoint(root)
    return root


@pytest.fixture(scope="session")
def shared_server(server_checkpoint, tmp_path_factory):
    """One server process on `server_checkpoint`, with a token-id chat template, shared by the
    server test files (each still checks that the server goes on after what it sends)."""
    from tests.server_fixtures import CHAT_TEMPLATE, Server

    folder = tmp_path_factory.mktemp("shared_server")
    (folder / "chat.jinja").write_text(CHAT_TEMPLATE)
    srv = Server(server_checkpoint, str(folder / "server.log"), extra=["--chat-template", str(folder / "chat.jinja")])
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def server_engine(server_checkpoint):
    """The model and tokenizer of `server_checkpoint` in this process: read them, never change them."""
    from megatron.early_exit.inference.loading import load_model

    model, tokenizer, _ = load_model(server_checkpoint)
    return model, tokenizer


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> str:
    """tests/tokenizer_fixtures.py's generated sentences as a text file."""
    from tests.tokenizer_fixtures import sentences

    path = tmp_path_factory.mktemp("sentences") / "corpus.txt"
    path.write_text("\n".join(sentences(2000)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def sp_model(corpus_file, tmp_path_factory) -> str:
    """A SentencePiece model (500 pieces) trained on `corpus_file`."""
    from megatron.early_exit.tokenizers import train_sentencepiece

    return train_sentencepiece(corpus_file, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=500)


@pytest.fixture(scope="session")
def preprocess_tool():
    """tools/preprocess_data.py as a module, to call its `main` in this process."""
    from tests.tokenizer_fixtures import load_preprocess_tool

    return load_preprocess_tool()


@pytest.fixture(scope="session")
def reshard_inputs(dist1, corpus, request):
    """What cases_reshard reads in its folder: a TP=1 checkpoint, its logits at every exit,
    and its generations (full depth and pipeline-based early exit)."""
    import torch

    from megatron.early_exit.inference import EarlyExit, FullDepth, generate
    from megatron.early_exit.inference.loading import load_model
    from tests.multiproc.cases_reshard import FLAGS, PROMPTS, TOKENS, logits_by_layer
    from tests.training_fixtures import run_training, tiny_run_flags

    root = case_output_dir(request, "tests.multiproc.cases_reshard")
    state = run_training(tiny_run_flags(corpus, iters=3, **FLAGS, **{"--save": os.path.join(root, "tp1")}))
    torch.save(logits_by_layer(state.model.module, TOKENS), os.path.join(root, "tp1_logits.pt"))
    model = load_model(os.path.join(root, "tp1"))[0]
    torch.save(
        {
            name: (out.tokens, out.exit_layers)
            for name, out in (
                ("full", generate(model, PROMPTS, FullDepth(), max_new_tokens=12)),
                ("early", generate(model, PROMPTS, EarlyExit(0.2, kv="pipeline"), max_new_tokens=12)),
            )
        },
        os.path.join(root, "tp1_generations.pt"),
    )
    return root


@pytest.fixture(scope="session")
def hf_tp2_pp2_inputs(dist1, request):
    """What cases_hf reads: a random Llama model converted for TP=2 x PP=2 with exits on both
    stages, and its one-process logits (final and every exit)."""
    import torch

    from tests.hf_fixtures import add_exits, batch, import_llama, load, save_random_llama

    root = case_output_dir(request, "tests.multiproc.cases_hf")
    save_random_llama(os.path.join(root, "hf"), seed=13, num_key_value_heads=2)
    import_llama(os.path.join(root, "hf"), os.path.join(root, "ours"), tp=2, pp=2)
    add_exits(
        os.path.join(root, "ours"),
        os.path.join(root, "ee"),
        copy_init=False,
        exit_layer_nums=[1, 3],
        use_exit_norm=True,
        untie_exit_output_weights=True,
    )  # exits on both stages (layers 1-2 and 3-4)
    model = load(os.path.join(root, "ee"))
    tokens, pos = batch()
    with torch.no_grad():
        out = model(tokens, pos, None)
        reference = {
            "tokens": tokens,
            "position_ids": pos,
            "vocab_size": model.vocab_size,
            "final": out.final,
            "exits": {p.layer_number: p.compute_logits().transpose(0, 1) for p in out.exits},
        }
    torch.save(reference, os.path.join(root, "reference.pt"))
    return {"EE_HF_CHECKPOINT": os.path.join(root, "ee"), "EE_HF_REFERENCE": os.path.join(root, "reference.pt")}


@pytest.fixture(scope="session")
def evaluate_inputs(dist1, tmp_path_factory):
    """tests/evaluate_fixtures.py's checkpoint and lm-eval tasks, written once: read them, never change them."""
    from tests.evaluate_fixtures import write_inputs

    return write_inputs(str(tmp_path_factory.mktemp("evaluate")))


@pytest.fixture(scope="session")
def evaluate_launch_env(evaluate_inputs, corpus):
    """What test_evaluate's TP/PP cases read in the grouped launch."""
    return {
        "EE_EVAL_CKPT": evaluate_inputs["checkpoint"],
        "EE_EVAL_DATA": corpus,
        "EE_EVAL_TASKS": evaluate_inputs["task_dir"],
    }
