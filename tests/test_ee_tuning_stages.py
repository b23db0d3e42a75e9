"""EE-Tuning on partial pipeline stages, end to end: a PP=2 model trained and saved, its
exits tuned on the first stage only (--tune-exit-pipeline-parallel-size 1) from the full
checkpoint, merged back with tools/checkpoint/add_exits.py --exits-from, then served."""

import dataclasses
import os
import runpy

import pytest
import torch

from tests.conftest import ROOT, case_output_dir, launch_grouped
from tests.training_fixtures import tiny_run_flags

TUNED_LAYERS = 2  # the first of 2 stages of a 4-layer model


@pytest.fixture(scope="module")
def runs(request):
    results = launch_grouped("tests.multiproc.cases_ee_tuning_stages", request)
    for case, result in results.items():
        assert result["ok"], f"{case}: {result['error']}"
    return case_output_dir(request, "tests.multiproc.cases_ee_tuning_stages")


def _weights(root):
    from megatron.early_exit.inference.loading import load_model
    from megatron.early_exit.sharding import full_state_dict

    model, _, config = load_model(root, 1, device=torch.device("cpu"))
    return model, config, full_state_dict(model)


def _add_exits(*argv):
    main = runpy.run_path(os.path.join(ROOT, "tools", "checkpoint", "add_exits.py"), run_name="add_exits")["main"]
    main(list(argv))


@pytest.mark.multiproc  # in make test: the EE-Tuning path users take, end to end
def test_exits_tuned_on_the_first_stage_merge_back_and_serve(dist1, runs):
    from megatron.early_exit.inference import EarlyExit, generate

    base_dir, tuned_dir, merged_dir = (os.path.join(runs, name) for name in ("base", "tuned", "merged"))
    _, base_config, base = _weights(base_dir)
    _, tuned_config, tuned = _weights(tuned_dir)
    # The tuning run built and saved only the first stage: layers 1-2 and their exits.
    assert base_config.num_layers == 4 and not base_config.first_stages_only
    assert tuned_config.num_layers == TUNED_LAYERS and tuned_config.first_stages_only
    assert "decoder.layers.1.mlp.linear_fc2.weight" in tuned and "decoder.layers.2.mlp.linear_fc2.weight" not in tuned
    exit_keys = sorted(k for k in base if k.startswith("exits."))
    assert exit_keys and {k for k in tuned if k.startswith("exits.")} == set(exit_keys)
    for key in tuned:  # the backbone was frozen, the exits trained
        assert torch.equal(tuned[key], base[key]) != key.startswith("exits."), key

    _add_exits("--load", base_dir, "--exits-from", tuned_dir, "--save", merged_dir)
    model, merged_config, merged = _weights(merged_dir)
    assert merged_config.num_layers == 4 and not merged_config.first_stages_only
    assert merged_config.early_exit == base_config.early_exit and sorted(merged) == sorted(base)
    for key in merged:
        assert torch.equal(merged[key], tuned[key] if key.startswith("exits.") else base[key]), key

    # Served with every token after the first leaving at exit 1: the tuned exit's greedy choices.
    prompt = [3, 6, 9, 12, 15, 18]
    result = generate(model, [prompt], EarlyExit(threshold=0.0), max_new_tokens=6)
    assert len(result.tokens[0]) == 6 and result.exit_layers[0] == [4] + [1] * 5
    expected, sequence = [], list(prompt)
    with torch.no_grad():
        for step in range(6):
            x = torch.tensor([sequence])
            out = model(x, torch.arange(len(sequence)).unsqueeze(0), None)
            logits = out.final[0, -1] if step == 0 else out.exits[0].compute_logits()[-1, 0]
            expected.append(int(logits.argmax()))
            sequence.append(expected[-1])
    assert result.tokens[0] == expected


# -- the same rules, without running (make test) ---------------------------------------------


def test_the_flags_describe_the_whole_model_and_the_run_builds_its_first_stages(corpus):
    from megatron.early_exit.training.arguments import build_run_config, parse_args

    args = parse_args(
        tiny_run_flags(
            corpus,
            **{
                "--num-layers": 8,
                "--exit-layer-nums": "2 3",
                "--exit-layer-weight": "1 1",
                "--pipeline-model-parallel-size": 4,
                "--tune-exit": None,
                "--tune-exit-pipeline-parallel-size": 2,
                "--global-batch-size": 4,
            },
        ),
        world_size=4,
    )
    assert (args.num_layers, args.pipeline_model_parallel_size) == (8, 4)  # as given: what --use-checkpoint-args stores
    assert build_run_config(args).built_stages == (4, 2) and args.data_parallel_size == 2
    whole, built = build_run_config(args).model_config(64), build_run_config(args).built_model_config(64)
    assert (whole.num_layers, whole.first_stages_only) == (8, False)
    assert (built.num_layers, built.first_stages_only) == (4, True)
    assert dataclasses.replace(built, num_layers=8, first_stages_only=False) == whole


def test_a_checkpoint_is_compared_with_the_whole_model(corpus):
    from megatron.early_exit.checkpoint.compatibility import compare_with_checkpoint
    from megatron.early_exit.checkpoint.errors import CheckpointError
    from megatron.early_exit.training.arguments import build_run_config, parse_args
    from megatron.early_exit.training.checkpointing import _compared_model

    def run(world_size, **flags):
        args = parse_args(
            tiny_run_flags(
                corpus, **{"--pipeline-model-parallel-size": 2, "--tune-exit": None, "--global-batch-size": 2, **flags}
            ),
            world_size=world_size,
        )
        return args, build_run_config(args).built_model_config(64)

    args, built = run(1, **{"--tune-exit-pipeline-parallel-size": 1})
    full = build_run_config(run(2)[0]).model_config(64)  # the checkpoint a PP=2 run saved
    assert compare_with_checkpoint(full, _compared_model(full, built, args.num_layers, "ckpt")) == []
    deeper = dataclasses.replace(full, num_layers=8)  # another model: refused, though its first layers would load
    with pytest.raises(CheckpointError, match="--num-layers: checkpoint 8, now 4"):
        compare_with_checkpoint(deeper, _compared_model(deeper, built, args.num_layers, "ckpt"))
    # The tuned checkpoint (first stage only) resumes with the same layout, and nothing else.
    assert compare_with_checkpoint(built, _compared_model(built, built, args.num_layers, "ckpt")) == []
    with pytest.raises(
        CheckpointError, match="holds only the first 2 layers .* this run builds 4 of 4: .* --exits-from"
    ):
        _compared_model(built, full, 4, "ckpt")
