"""An engine run (``jaxcl run``) of a SAPT config with candidate fixes of ``variants.py`` on.

    PYTHONPATH=$PWD python experiments/sapt/run_variant.py '{"detach": 1}' CONFIG.yaml --out DIR
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import variants  # noqa: E402
from jaxcl import cli  # noqa: E402

if __name__ == "__main__":
    variants.apply(json.loads(sys.argv[1]))
    sys.exit(cli.main(["run", *sys.argv[2:]]))
