# shellcheck shell=bash
# The set-up scripts/run, scripts/test and scripts/queue share: sourced, not run.
#
# Each step is idempotent and quick once done, and says what it does on stderr:
# - a RabbitMQ on 127.0.0.1:5672: started (`rabbitmq-server -detached`) if installed
#   and down, installed with apt-get first where it is missing and this runs as root;
#   otherwise a clear message says what to install;
# - .venv: Python packages of examples/python and scripts/ (requirements.txt files),
#   reinstalled when those files change;
# - examples/node/node_modules: `npm ci`, again when package-lock.json changes.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
# rabbitmq-server and rabbitmqctl live in /usr/sbin, which a user's PATH may lack.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { echo "== $*" >&2; }
die() {
  echo "scripts/${0##*/}: $*" >&2
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# apt-get install, where the machine allows it (root, apt-get present); false otherwise.
apt_install() {
  [[ $(id -u) == 0 ]] && have apt-get || return 1
  if [[ -z "${apt_updated:-}" ]]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
    apt_updated=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2
}

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

ensure_rabbitmq() {
  if broker_up; then
    say "RabbitMQ is up on 127.0.0.1:5672"
    return
  fi
  if ! have rabbitmq-server; then
    apt_install rabbitmq-server || die "RabbitMQ is not running on 127.0.0.1:5672 and \
rabbitmq-server is not installed (and cannot be installed here: that needs root and \
apt-get). Install it (Debian/Ubuntu: sudo apt-get install rabbitmq-server; macOS: \
brew install rabbitmq), start it (sudo rabbitmq-server -detached), and run this again."
    # The package may have started it already.
    for _ in $(seq 1 20); do broker_up && break; sleep 0.5; done
  fi
  if ! broker_up; then
    say "starting RabbitMQ (rabbitmq-server -detached)"
    rabbitmq-server -detached >&2 || true
    # The AMQP port opens last, once the node has booted (about 5-10 s).
    for _ in $(seq 1 90); do broker_up && break; sleep 1; done
  fi
  broker_up || die "RabbitMQ did not come up on 127.0.0.1:5672. Start it by hand \
(as root: rabbitmq-server -detached, or systemctl start rabbitmq-server; its log is \
under /var/log/rabbitmq/) and run this again."
  say "RabbitMQ is up on 127.0.0.1:5672"
}

ensure_cargo() {
  have cargo || die "cargo is not installed: install Rust (https://rustup.rs) and run this again."
}

# Whether `python3 -m venv` works (Debian's python3 needs the python3-venv package).
venv_works() {
  local probe ok=0
  probe="$(mktemp -d)"
  python3 -m venv "$probe/v" >/dev/null 2>&1 || ok=1
  rm -rf "$probe"
  return $ok
}

ensure_venv() {
  if ! have python3; then
    apt_install python3 python3-venv ||
      die "python3 is not installed: install Python 3.9 or later (with venv) and run this again."
  fi
  if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c '' 2>/dev/null; then
    if ! venv_works; then
      if ! { apt_install python3-venv && venv_works; }; then
        die "python3 -m venv does not work here: install it (Debian/Ubuntu: sudo apt-get \
install python3-venv) and run this again."
      fi
    fi
    rm -rf "$venv"
    say "creating .venv ($(python3 --version 2>&1))"
    python3 -m venv "$venv"
  fi
  local requirements=(examples/python/requirements.txt scripts/requirements.txt)
  local stamp="$venv/.ingest-requirements" want
  want="$(cd "$repo" && sha256sum "${requirements[@]}")"
  if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    say "installing Python packages into .venv (${requirements[*]})"
    (cd "$repo" && "$venv/bin/python" -m pip install -q --disable-pip-version-check \
      "${requirements[@]/#/--requirement=}") >&2
    echo "$want" >"$stamp"
  fi
}

ensure_node_modules() {
  if ! have npm || ! have node; then
    apt_install nodejs npm ||
      die "Node.js (18.3 or later) and npm are not installed: install them and run this again."
  fi
  local dir="$repo/examples/node"
  local stamp="$dir/node_modules/.ingest-package-lock" want
  want="$(sha256sum <"$dir/package-lock.json")"
  if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    say "installing Node packages into examples/node/node_modules (npm ci)"
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >&2
    echo "$want" >"$stamp"
  fi
}
