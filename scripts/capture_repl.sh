#!/usr/bin/env bash
# Records a terminal session of llaisys-chat (tmux, 120x50) into docs/repl-session.txt for the README.
# Uses the running cluster, or starts one; needs tmux.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tmux kill-session -t llaisys-capture 2>/dev/null || true
tmux new-session -d -s llaisys-capture -x 120 -y 50 ".venv/bin/llaisys-chat --max-tokens 200 --seed 7; sleep 30"
wait_for() { for _ in $(seq 120); do tmux capture-pane -t llaisys-capture -p | grep -q "$1" && return; sleep 0.5; done; }
wait_for "Ctrl-D to quit"
tmux send-keys -t llaisys-capture "Write a Python function that reverses a string." Enter
wait_for "decode\|^>>> $" ; sleep 8
tmux send-keys -t llaisys-capture "/stats" Enter; sleep 1
tmux send-keys -t llaisys-capture "Now explain it in one sentence." Enter; sleep 6
tmux capture-pane -t llaisys-capture -p > docs/repl-session.txt
tmux send-keys -t llaisys-capture C-d
sleep 5
tmux kill-session -t llaisys-capture 2>/dev/null || true
echo "wrote docs/repl-session.txt"
