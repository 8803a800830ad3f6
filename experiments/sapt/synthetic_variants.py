"""Candidate fixes of SAPT's routing (``variants.py``) on the three-task synthetic stream of
``synthetic_routing.py`` (CPU, 10-30 s a setting): the % of each task's held-out prompts routed to it
after the last task. RESULTS.md, "Candidate fixes", reports them (raw: ``synthetic_variants.jsonl``).

    PYTHONPATH=$PWD:$PWD/tests python experiments/sapt/synthetic_variants.py \
        '{"variant": {"noise": 2.0}, "kl_ratio": 1.0}' '{"variant": {"freeze_query": 1}}'

Each argument: SAPT options, plus ``"variant"`` (a dict of ``variants.py`` keys).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic_routing  # noqa: E402
import variants  # noqa: E402

if __name__ == "__main__":
    for arg in sys.argv[1:] or ['{"variant": {}}']:
        options = json.loads(arg)
        variants.apply(options.pop("variant", {}))
        print(json.dumps({"variant": dict(variants.V), "options": options,
                          "routing_after_last_task": synthetic_routing.routing(options)}), flush=True)
