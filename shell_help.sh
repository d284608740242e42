#!/usr/bin/env bash
# Sourced by the shell runners: `bash run_X.sh --help` prints the script's header comment and every
# setting it reads (an environment variable), with its current value and meaning, then exits 0 before
# any work starts. A setting is a line `NAME=${NAME:-default}  # meaning` of the calling script.
shell_help() {  # $1: the calling script; $2: the script's first argument
  case "${2:-}" in -h|--help) ;; *) return 0 ;; esac
  local line name default meaning
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$1"
  echo
  echo "settings (environment variables): NAME = current value [default] meaning"
  while IFS= read -r line; do
    name=${line%%=*}
    meaning=""
    [[ $line == *"  # "* ]] && meaning=${line#*  # }
    default=${line%%  # *}
    default=${default%"${default##*[! ]}"}
    default=${default#*:-}
    default=${default%\}}
    printf '  %-18s = %-28s [%s] %s\n' "$name" "${!name:-(default)}" "$default" "$meaning"
  done < <(grep -E '^[A-Z0-9_]+=\$\{[A-Z0-9_]+:-' "$1")
  exit 0
}
