#!/usr/bin/env bash
# Prepare a lent GPU machine (no network) to run vramplan from this checkout, then run the
# command given as arguments. Carried wheels (.whl/: bitsandbytes, pydantic and its needs)
# are installed into /tmp/site; vramplan itself is mapped from the source tree the way the
# installed distribution lays it out (planner/ -> vramplan, validate/ -> vramplan.validate,
# profiles/ -> vramplan.profiles), so the run always uses the code it was sent with.
#
#   scripts/device-run.sh python3 -m vramplan.validate.sweep MATRIX OUT.jsonl SECONDS
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if compgen -G "$root/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$root"/.whl/*.whl
fi
mkdir -p /tmp/vp/vramplan
for entry in "$root"/planner/*; do ln -sfn "$entry" /tmp/vp/vramplan/; done
ln -sfn "$root/validate" /tmp/vp/vramplan/validate
ln -sfn "$root/profiles" /tmp/vp/vramplan/profiles
export PYTHONPATH=/tmp/vp:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
exec "$@"
