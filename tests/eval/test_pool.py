import pytest

from instune.eval.evaluate import EvalSettings, evaluate_in_process
from instune.eval.pool import evaluate_with_ray


@pytest.mark.slow
def test_actor_pool_matches_in_process(ray_cluster, tiny_adapter_and_merged, tiny_eval_sets):
    adapter_dir, _ = tiny_adapter_and_merged
    settings = EvalSettings(max_length=64, max_new_tokens=5, batch_size=3)
    # Two actors share the batches; every example still comes back once, scored as in one process.
    pooled, pooled_answers = evaluate_with_ray(str(adapter_dir), tiny_eval_sets, settings, num_actors=2,
                                               use_gpu=False)
    local, local_answers = evaluate_in_process(str(adapter_dir), tiny_eval_sets, settings)
    assert [(r.name, r.examples) for r in pooled] == [("arith_a", 5), ("arith_b", 2), ("units", 3)]
    assert [r.loss for r in pooled] == pytest.approx([r.loss for r in local], rel=1e-4)
    assert pooled_answers == local_answers
    assert [r.exact_match for r in pooled] == [r.exact_match for r in local]
