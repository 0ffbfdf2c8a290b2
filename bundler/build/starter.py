"""The commented starter profile written by `bundle init`."""

STARTER = """\
# bundler profile: what to carry across the air gap, and how to run it there.
# Check it with `bundle validate bundle.yaml`; build with
#   bundle build bundle.yaml --key release.key --out dist/
schema: 1
name: myapp                 # product name: lowercase letters, digits, '-'
version: 0.1.0              # release version (also the release directory name)
# sequence: 1               # monotonic integer; default: the build time (seconds)
# expires: 180d             # refuse to install after this long (ms, s, m, h, d)

# The services, migrations and command health checks run as this unprivileged account,
# never as root (bundler itself installs as root). Create it on the target once:
#   useradd --system myapp
# It gets write access to the release's logs/ and run/ (and a SQLite database's directory);
# everything else stays root's and read-only to it. A service may name its own `user:`.
user: myapp

target:                     # the AIR-GAPPED host, not this machine
  python: "3.11"            # its CPython major.minor
  platform: manylinux_2_28_x86_64   # its wheel platform (glibc 2.28+, x86_64)

python:
  requirements: requirements.txt    # pinned: name==version, ideally with --hash
  # index_url: https://pypi.example.internal/simple   # default: pip's default index
  # find_links: [wheelhouse]        # local directories of wheels
  # no_index: false

files:                      # copied into <release>/files/<dest>
  - src: app
    dest: app
    exclude: ["__pycache__", "*.pyc"]

services:                   # supervised processes, restarted if they crash
  - name: web
    cwd: app                # relative to <release>/files
    command: ["{venv}/bin/python", "-m", "http.server", "8000", "--bind", "127.0.0.1"]
    env:
      APP_ENV: production

health:                     # the release goes live only when all of these pass
  - name: web
    http: http://127.0.0.1:8000/
    expect_status: 200
    timeout: 2s
    retries: 30
    interval: 500ms

install:
  keep: 3                   # releases kept on disk for rollback
"""
