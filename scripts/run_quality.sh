#!/usr/bin/env bash
# The published quality run in one command: every method x 2K/4K/8K on >= 50 prompts per cell (TRIALS x 4 tasks),
# the shared-context multi-query rows (MQ_TRIALS contexts x QUERIES questions), the kvpress peers when
# .venv-kvpress exists (scripts/setup_kvpress.sh), then one merged JSON, the README quality table and the plot.
# One process per (mode, context, method), JOBS at a time, each with nproc/JOBS threads; a finished output is
# kept and a killed cell's finished prompts are in <out>.partial.jsonl, so a rerun resumes where it stopped.
# Outputs: $RUNS/*.json (per-sample records kept) -> bench/results/quality-smollm2.json. Only the top level of
# $RUNS is merged: analyses on the same prompts (a second ThinK window, the A2ATS top-K sweep, the peers pilot,
# the model-history shared-context runs) sit in its subfolders so they never pool with the published cells.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-bench/results/quality-runs}
TRIALS=${TRIALS:-13}
# 4 tasks x 13 trials = 52 prompts per cell. No pass-key task: SmolLM2 answers "The pass key is" with
# " a special type of key used in the game of pass-" (noise haystack) or a Python keyword (prose) under
# the chat template even with the full cache (0/10 at 2K, 0/2 at 4K, measured 2026-12-07), so its
# prompts would only dilute every cell.
TASKS=${TASKS:-niah_single,niah_multikey,niah_multivalue,niah_multiquery}
# multi-query rows follow SCBench's multi-turn protocol (kvcomp eval --history gold, its default): a later
# question comes after the gold answers, so it measures the shared compressed cache; with the model's own
# answers (--history model) an earlier miss is carried forward: 7 of 8 duo later-question losses at 2K were
# lost by the full cache too on duo's conversation (bench/mq_history_check.py, quality-runs/mq-model-history/)
MQ_TRIALS=${MQ_TRIALS:-50}
QUERIES=${QUERIES:-4}
CONTEXTS=${CONTEXTS:-"2048 4096 8192"}
METHODS=${METHODS:-"full duo think vq all"}
# each part's contexts ("" skips that part), e.g. SINGLE_CONTEXTS=8192 MQ_CONTEXTS= PEER_CONTEXTS= in one
# process and the rest in another (THREADS=1 each) to keep both cores busy through the single-threaded decode
SINGLE_CONTEXTS=${SINGLE_CONTEXTS-$CONTEXTS}
MQ_CONTEXTS=${MQ_CONTEXTS-$CONTEXTS}
PEER_CONTEXTS=${PEER_CONTEXTS-$CONTEXTS}
JOBS=${JOBS:-2}
DTYPE=${DTYPE:-bfloat16}  # what vLLM serves; on CPUs with AMX ~5x faster than float32 for the same prompts
export OMP_NUM_THREADS=${THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
mkdir -p "$RUNS"
jobs_file=$(mktemp)
# single-query cells first (the published table), then the shared-context rows, then the peers: a run cut
# short leaves the most important outputs finished
for ctx in $SINGLE_CONTEXTS; do
  for m in $METHODS; do
    echo "$RUNS/single-$ctx-$m.json .venv/bin/kvcomp eval --dtype $DTYPE --methods $m --context-lens $ctx --tasks $TASKS --trials $TRIALS --haystacks prose --batch-size 4 --keep-samples" >> "$jobs_file"
  done
done
for ctx in $MQ_CONTEXTS; do
  for m in $METHODS; do
    echo "$RUNS/mq-$ctx-$m.json .venv/bin/kvcomp eval --dtype $DTYPE --mode multi-query --queries $QUERIES --methods $m --context-lens $ctx --trials $MQ_TRIALS --haystacks prose --keep-samples" >> "$jobs_file"
  done
done
if [ -x .venv-kvpress/bin/python ]; then
  for ctx in $PEER_CONTEXTS; do
    echo "$RUNS/peers-$ctx.json .venv-kvpress/bin/python bench/peers_kvpress.py --dtype $DTYPE --context-lens $ctx --tasks $TASKS --trials $TRIALS" >> "$jobs_file"
  done
fi
t0=$(date +%s)
# each line: OUTPUT COMMAND...; skipped when OUTPUT exists; the log sits next to it
xargs -P "$JOBS" -L 1 sh -c 'out=$0; [ -f "$out" ] && exit 0; "$@" --out "$out" > "${out%.json}.log" 2>&1 \
  || echo "[quality] FAILED: $* (log: ${out%.json}.log)"' < "$jobs_file"
rm -f "$jobs_file"
echo "[quality] runs finished in $(( $(date +%s) - t0 )) s"
.venv/bin/python bench/merge_quality.py "$RUNS"/*.json --out bench/results/quality-smollm2.json \
  --plot bench/results/quality-smollm2.png --readme README.md
