#!/usr/bin/env bash
# scripts/same_reports.sh REV: do the committed studies' reports and exports read the same at
# REV and in this tree? Runs `nas report` on every study of docs/results/ and `nas export --best 5`
# on two, from both trees, on one frozen copy of each database, and diffs the outputs (the
# report's "generated" time and the output folder aside). Exit 0: byte for byte the same.
set -euo pipefail
rev=${1:?usage: scripts/same_reports.sh REV}
here=$(cd "$(dirname "$0")/.." && pwd)
py=$here/.venv/bin/python
work=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$work/before" >/dev/null 2>&1; rm -rf "$work"' EXIT
git -C "$here" worktree add --detach "$work/before" "$rev" >/dev/null
mkdir -p "$work/db"
for db in resformer_scaling resformer_depth; do  # copies: a running study may write the originals
  "$py" -c "import sqlite3,sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" \
    "$here/docs/results/$db.db" "$work/db/$db.db"
done
declare -A stored=([resformer_scaling]=resformer_scaling [resformer_tokens]=resformer_scaling
  [resformer_prose]=resformer_scaling [resformer_scaling_probe]=resformer_scaling
  [resformer_primary]=resformer_depth [resformer_depth]=resformer_depth)
for side in before after; do
  tree=$here; [ $side = before ] && tree=$work/before
  out=$work/out/$side; mkdir -p "$out"
  for study in "${!stored[@]}"; do
    url=sqlite:///$work/db/${stored[$study]}.db
    (cd "$tree" && PYTHONPATH=$tree HF_HUB_OFFLINE=1 "$py" -m nas report "studies/$study.yaml" \
      --storage "$url" --out "$out/$study.html" > "$out/$study.txt" 2>&1)
  done
  for study in resformer_primary resformer_scaling; do
    (cd "$tree" && PYTHONPATH=$tree "$py" -m nas export "studies/$study.yaml" --best 5 \
      --storage "sqlite:///$work/db/${stored[$study]}.db" --out "$out/export-$study" \
      > "$out/export-$study.txt" 2>&1)
  done
  sed -i "s#$out#OUT#g; s#generated [0-9-]* [0-9:]*#generated TIME#" "$out"/*.txt "$out"/*.html
done
diff -r "$work/out/before" "$work/out/after" && echo "the same: $(ls "$work/out/after" | wc -l) outputs"
