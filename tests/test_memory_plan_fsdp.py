"""The memory planner's data-parallel options. FSDP: one process's memory with weights, gradients and optimizer
state sharded over the world size, plus what FSDP gathers whole (two decoder layers, the embedding/head/norm)
while forward and backward run. DDP: the whole model, with every gradient resident in DDP's buckets. Derived from
the model's parameter counts; not measured (FSDP's all-gather buffers run on GPUs in practice). The trainer's
forecast and out-of-memory advice plan the run's own world."""
import pytest

from rpo_fast.config import load_config, parse_overrides
from rpo_fast.memory_plan import GiB, World, forecast, main, model_shape, plan_for_train_config, plan_memory
from rpo_fast.oom import out_of_memory_message, update_out_of_memory_message

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
    (dict(fsdp_processes=2, optimizer="adamw_bf16_in_backward"), "optimizer: .* fsdp_processes=2"),
    (dict(ddp_processes=2, optimizer="adamw_bf16_in_backward"), "optimizer: .* ddp_processes=2"),
    (dict(ddp_processes=0), "ddp_processes: expected an integer >= 1"),
    (dict(ddp_processes=2, fsdp_processes=2), "ddp_processes: expected 1 with fsdp_processes=2"),
])
def test_bad_fsdp_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_memory("mistral-7b", **{**OPTIONS, **kwargs})


def test_ddp_holds_every_gradient_from_the_start():
    """DDP's buckets (the gradients themselves, as views) are allocated when the model is wrapped: every phase
    holds all gradients; the phases that held them all already are unchanged."""
    one, ddp = plan_memory("mistral-7b", **OPTIONS), plan_memory("mistral-7b", ddp_processes=4, **OPTIONS)
    gradients = 2 * model_shape("mistral-7b").n_params  # bf16, every weight trainable
    assert ddp.phases["loss forward"] == one.phases["loss forward"] + gradients
    assert ddp.phases["optimizer step"] == one.phases["optimizer step"]
    assert 0 < ddp.phases["backward, last layer"] - one.phases["backward, last layer"] < gradients  # the head's
    assert any("DDP over 4 processes" in note for note in ddp.notes)
    lora = dict(OPTIONS, mode="lora", reference="lora_disabled")
    assert plan_memory("mistral-7b", ddp_processes=4, **lora).phases["loss forward"] > \
        plan_memory("mistral-7b", **lora).phases["loss forward"]


def test_the_trainer_forecast_and_out_of_memory_advice_plan_the_run_world():
    """A run launched on 8 processes is planned per process: FSDP shards it, DDP holds the whole model; and
    in-backward optimizers, which the trainer refuses there, are not advised."""
    config = load_config("configs/mistral7b_full_80gb.yaml", {"optimizer": "adamw", "dtype": "float32",
                                                               "mixed_precision": "bf16"})
    gpu = int(79.1 * GiB)
    fsdp = plan_for_train_config(config, world=World(8, fsdp=True))
    assert fsdp.options["fsdp_processes"] == 8 and fsdp.fits(gpu)
    assert plan_for_train_config(config, world=World(8)).options["ddp_processes"] == 8
    assert forecast(config, "mistral-7b", gpu, World(8, fsdp=True)).startswith(
        f"memory plan: predicted peak {fsdp.peak_bytes / GiB:.1f} GiB")
    assert forecast(config, "mistral-7b", gpu, World(8, fsdp=True)).endswith(": fits")
    assert "does NOT fit" in forecast(config, "mistral-7b", gpu)

    alone = update_out_of_memory_message(config, 3, "mistral-7b", gpu)
    sharded = update_out_of_memory_message(config, 3, "mistral-7b", gpu, World(8, fsdp=True))
    assert f"predicts a peak of {fsdp.peak_bytes / GiB:.1f} GiB" in sharded
    assert "_in_backward" not in sharded and "_in_backward" not in out_of_memory_message(
        config, 3, 4, 4096, 4096, "mistral-7b", gpu, World(2))
    # one process: the in-backward advice loads as written (it needs no accumulation)
    assert config.gradient_accumulation_steps > 1
    advised = "--optimizer=adamw_bf16_in_backward --max_grad_norm=0 --gradient_accumulation_steps=1"
    assert advised in alone
    assert load_config("configs/mistral7b_full_80gb.yaml", {"optimizer": "adamw", "dtype": "float32",
                                                            "mixed_precision": "bf16",
                                                            **parse_overrides(advised.split())}).steps_in_backward
