"""Every vLLM interface daskdp calls exists in the installed vLLM, and the version check holds.

No engine starts here: the names are looked up with hasattr and inspect. A vLLM release that
moves one of them fails here, not midway through a run.
"""

from __future__ import annotations

import inspect

import pytest

from daskdp.engine.engine import ALLOW_UNTESTED_VLLM, TESTED_VLLM, check_vllm_version

vllm = pytest.importorskip("vllm")


def source(obj) -> str:
    return inspect.getsource(obj)


def test_the_installed_vllm_is_the_tested_release():
    check_vllm_version()  # raises for an untested release
    assert vllm.__version__.startswith(f"{TESTED_VLLM}.")


def test_an_untested_vllm_gets_one_line_and_a_way_on(monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_VLLM, raising=False)
    with pytest.raises(RuntimeError) as refused:
        check_vllm_version("0.34.0")
    message = str(refused.value)
    assert "\n" not in message and "0.34.0" in message and f"{TESTED_VLLM}.x" in message
    assert f"{ALLOW_UNTESTED_VLLM}=1" in message
    monkeypatch.setenv(ALLOW_UNTESTED_VLLM, "1")
    check_vllm_version("0.34.0")
    check_vllm_version(f"{TESTED_VLLM}.7+cpu")


def test_the_llm_interfaces_daskdp_calls():
    from vllm import LLM

    assert "model" in inspect.signature(LLM.__init__).parameters  # LLM(model=..., **engine_args)
    assert callable(LLM.get_tokenizer)  # rendering and tokenizing prompts (engine/requests.py)
    assert callable(LLM.get_metrics)  # prefix-cache counters (engine/loop.py)
    assert "self.llm_engine" in source(LLM.__init__)


def test_the_engine_interfaces_daskdp_calls():
    from vllm.v1.engine.llm_engine import LLMEngine

    added = inspect.signature(LLMEngine.add_request).parameters
    assert list(added)[1:4] == ["request_id", "prompt", "params"]
    assert "request_ids" in inspect.signature(LLMEngine.abort_request).parameters
    assert callable(LLMEngine.step) and callable(LLMEngine.has_unfinished_requests)
    init = source(LLMEngine.__init__)
    for attribute in ("vllm_config", "model_config", "log_stats", "dp_group"):
        assert f"self.{attribute}" in init, attribute
    from vllm.config import SchedulerConfig

    assert "max_num_seqs" in SchedulerConfig.__dataclass_fields__


def test_the_parameters_and_outputs_daskdp_uses():
    from vllm import PoolingParams, SamplingParams
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.v1.metrics.reader import Counter
    from vllm.v1.metrics.stats import RequestStateStats

    sampling = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=4, seed=None, stop=None)
    sampling.output_kind = RequestOutputKind.FINAL_ONLY
    assert SamplingParams(ignore_eos=True).ignore_eos
    assert PoolingParams is not None and StructuredOutputsParams is not None  # the next tasks' parameters
    outputs = inspect.signature(RequestOutput.__init__).parameters
    assert {"request_id", "outputs", "finished", "metrics"} <= set(outputs)
    assert {"text", "token_ids", "finish_reason"} <= set(inspect.signature(CompletionOutput).parameters)
    assert {"first_token_latency", "scheduled_ts", "queued_ts"} <= set(RequestStateStats.__dataclass_fields__)
    assert {"name", "value"} <= set(inspect.signature(Counter).parameters)


def test_the_process_interfaces_daskdp_uses():
    import vllm.envs
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    assert callable(vllm.envs.disable_envs_cache) and callable(cleanup_dist_env_and_memory)
    for variable in (
        "VLLM_DP_RANK",
        "VLLM_DP_RANK_LOCAL",
        "VLLM_DP_SIZE",
        "VLLM_DP_MASTER_IP",
        "VLLM_DP_MASTER_PORT",
        "VLLM_ENABLE_V1_MULTIPROCESSING",
        "VLLM_CPU_OMP_THREADS_BIND",
    ):
        assert variable in vllm.envs.environment_variables, variable
    import vllm.config.parallel

    assert "envs.VLLM_DP_SIZE" in source(vllm.config.parallel)  # read when LLM is built


def test_the_scheduler_state_work_stealing_reads():
    """`daskdp.engine.stealing.unstarted`: which requests the engine has not started."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.request import Request, RequestStatus

    assert "self.engine_core = EngineCoreClient.make_client(" in source(LLMEngine.__init__)
    assert "self.output_processor" in source(LLMEngine.__init__)
    assert "self.engine_core = EngineCore(" in source(InprocClient.__init__)
    assert "self.scheduler" in source(EngineCore.__init__)
    assert "self.requests: dict[str, Request]" in source(Scheduler.__init__)
    assert "self.external_req_ids" in source(OutputProcessor.__init__)
    assert RequestStatus.WAITING is not None
    assert "self.num_computed_tokens" in source(Request.__init__)
    assert isinstance(Request.num_output_tokens, property)
