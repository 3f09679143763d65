"""The memory planner's FSDP option: one process's memory with weights, gradients and optimizer state sharded
over the world size, plus what FSDP gathers whole (two decoder layers, the embedding/head/norm) while forward
and backward run. Derived from the model's parameter counts; not measured (FSDP's all-gather buffers run on
GPUs in practice)."""
import pytest

from rpo_fast.memory_plan import GiB, main, model_shape, plan_memory

OPTIONS = dict(max_length=512, micro_batch_pairs=1, optimizer="adamw", reference="precomputed", device="cpu")


def test_one_process_is_the_plain_plan():
    plain, one = plan_memory("mistral-7b", **OPTIONS), plan_memory("mistral-7b", fsdp_processes=1, **OPTIONS)
    assert one.components == plain.components and one.phases == plain.phases


@pytest.mark.parametrize("model", ["mistral-7b", "llama-3-8b", "gemma-7b"])
def test_sharded_state_divides_by_the_world_size(model):
    one = plan_memory(model, **OPTIONS)
    s = model_shape(model)
    static = 6 * s.n_params  # bf16 weights (2 B) and torch AdamW's two bf16 states (4 B)
    gathered = 2 * (2 * s.layer_params + s.embedding_params + s.head_params + s.hidden_size)
    for world in (2, 8):
        plan = plan_memory(model, fsdp_processes=world, **OPTIONS)
        # the optimizer step holds weights, gradients and optimizer state alone: all sharded
        assert plan.phases["optimizer step"] == pytest.approx(one.phases["optimizer step"] / world, rel=1e-6)
        # forward: sharded weights and states, plus the gathered units; activations unchanged
        assert plan.phases["loss forward"] == pytest.approx(
            one.phases["loss forward"] - static + static / world + gathered, rel=1e-6)
        assert any("FSDP over" in note for note in plan.notes)


def test_fsdp_makes_a_7b_full_fine_tune_fit_a_smaller_gpu(capsys):
    gpu = 40 * GiB
    options = dict(OPTIONS, device="cuda")
    assert not plan_memory("mistral-7b", **options).fits(gpu)
    assert plan_memory("mistral-7b", fsdp_processes=4, **options).fits(gpu)
    assert main(["--model", "mistral-7b", "--optimizer", "adamw", "--gpu-gb", "40"]) == 1
    assert main(["--model", "mistral-7b", "--optimizer", "adamw", "--gpu-gb", "40", "--fsdp", "4"]) == 0
    out = capsys.readouterr().out
    assert "per process of FSDP x 4" in out and "FSDP over 4 processes" in out
    # a training config too: --fsdp is not one of the options the config decides
    assert main(["--config", "configs/mistral7b_full_80gb.yaml", "--fsdp", "8", "--gpu-gb", "40"]) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(fsdp_processes=0), "fsdp_processes: expected an integer >= 1"),
    (dict(fsdp_processes=2, optimizer="adamw_bf16_in_backward"), "optimizer: .* before FSDP reduces"),
])
def test_bad_fsdp_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_memory("mistral-7b", **{**OPTIONS, **kwargs})
