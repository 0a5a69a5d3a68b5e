# Shifter: set-up, run and test on a Debian machine.  Run as root (or with
# sudo): set-up installs Debian packages, and the tests build network
# namespaces and boot a kernel under qemu.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

# What Shifter, its tests and its demo need from Debian.  The kernel
# module is tested in Debian 12's two kernels, 6.1 (linux-image-amd64) and
# 6.12 (linux-image-6.12-amd64, from bookworm-security, in every Debian 12
# machine's sources), each with its headers.
APT_PACKAGES := python3 python3-venv squid iptables nftables iproute2 conntrack \
	curl openssl procps util-linux systemd kmod make gcc build-essential \
	linux-headers-amd64 linux-image-amd64 \
	linux-headers-6.12-amd64 linux-image-6.12-amd64 qemu-system-x86 \
	iperf3 wrk nginx-light redsocks busybox-static linux-source-6.12 dante-server logrotate \
	krb5-kdc krb5-admin-server krb5-user libkrb5-dev publicsuffix dnsmasq-base \
	mmdebstrap systemd-container isc-dhcp-client groff-base man-db

# What building the debug kernel needs besides (make test-kernel-debug).
DEBUG_APT_PACKAGES := flex bison bc libelf-dev libssl-dev
DEBUG_KERNEL_CACHE ?= /var/cache/shifter-debug-kernel

PROXY ?= 127.0.0.1:3128
LISTEN ?= tcp:12345

.PHONY: setup apt venv run demo demo-down serve test unit docs man typecheck clean deb \
	test-kernel test-kernel-all test-kernel-debug

setup: apt venv

apt:
	@if [ "$$(dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | grep -c 'ok installed')" = "$(words $(APT_PACKAGES))" ]; then \
	    echo "Debian packages: all present"; \
	else \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml requirements-test.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q -e . --config-settings editable_mode=compat
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

# The demo: a whole gateway in network namespaces on this machine, built
# from the rules `python -m shifter.rules` prints, a real Squid, Shifter and
# curl, narrated; torn down at the end.
#   make run IPV6=1              the same over IPv6
#   make run RESOLVER=NAME       sockopt (default), conntrack, nfqueue, tproxy, or
#                                kmod (the module, in Debian's kernel under qemu)
#   make run KEEP=1              leave it running (prints how to tear it down)
#   make run DEBUG=1             a failure's traceback too
run: demo

demo: setup
	@$(if $(DEBUG),DEBUG=1) $(PY) demo/demo.py $(if $(IPV6),--ipv6) $(if $(KEEP),--keep) \
	    $(if $(RESOLVER),--resolver $(RESOLVER))

demo-down:
	$(PY) demo/demo.py --down $(NAME)

# Shifter for real on this machine, in the foreground, pointed at a Squid
# here (started if nothing listens on 3128 yet).
serve: setup
	@ss -Htln 'sport = :3128' | grep -q . || { echo "starting Squid on 127.0.0.1:3128"; squid; sleep 2; }
	@echo "Shifter on $(LISTEN), proxy $(PROXY). Redirect clients to it with, for example:"
	@echo "  iptables -t nat -A PREROUTING -i <lan interface> -p tcp --dport 443 -j REDIRECT --to-ports 12345"
	$(VENV)/bin/shifter run --listen $(LISTEN) --proxy $(PROXY)

# Every test: the API documentation and the types checked, then unit, end
# to end in namespaces, and the kernel module in a booted kernel.  The last
# line is the plain verdict.
test: setup docs typecheck
	@set -o pipefail; rm -rf _trial_temp; \
	$(PY) -m twisted.trial --reactor=shifter --temp-directory=_trial_temp tests 2>&1 | tee test.log; \
	status=$$?; $(PY) tests/summary.py < test.log && exit $$status

# Shifter's Debian packages, into dist/ (README, The Debian packages).
deb: apt
	python3 contrib/deb/build.py --out dist

# The kernel module alone: built for Debian's 6.1 and 6.12 kernels and its
# guest suite run in each, booted under qemu (what make test runs of it).
# KERNELS=6.12 (or 6.1) for one of them.
test-kernel test-kernel-all: setup
	rm -rf _trial_temp_kernel
	$(if $(KERNELS),SHIFTER_KERNELS="$(KERNELS)") $(PY) -m twisted.trial \
	    --temp-directory=_trial_temp_kernel tests.test_kernel

# The guest suite, and a longer churn of namespaces under SYN load, in a
# kernel built with lockdep, PROVE_RCU, KASAN and kmemleak from Debian's
# linux-source-6.12 (cached in DEBUG_KERNEL_CACHE: the first run builds it,
# the better part of an hour on two cores).  Not part of make test.
test-kernel-debug: setup
	@dpkg-query -W -f='$${Status}\n' $(DEBUG_APT_PACKAGES) 2>/dev/null | grep -c 'ok installed' | \
	    grep -qx "$(words $(DEBUG_APT_PACKAGES))" || \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBUG_APT_PACKAGES); }
	rm -rf _trial_temp_debug
	set -o pipefail; tree=$$(PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
	    sh kernel_module/tests/debug-kernel.sh $(DEBUG_KERNEL_CACHE) | tail -1) && \
	SHIFTER_DEBUG_KERNEL="$$tree" $(PY) -m twisted.trial --temp-directory=_trial_temp_debug \
	    tests.kernel_debug.DebugKernelTests

# API documentation of the public names (shifter.__all__) into apidocs/;
# any pydoctor warning fails it.  Every package and module under shifter/
# is internal: hidden, by its dotted name.
INTERNAL_MODULES := $(subst /,.,$(patsubst %/__init__.py,%,$(wildcard shifter/*/__init__.py)) \
	$(basename $(filter-out %/__init__.py,$(wildcard shifter/*.py shifter/*/*.py))))
docs: venv
	rm -rf apidocs
	$(PY) -m pydoctor --project-name=Shifter --html-output=apidocs --docformat=epytext \
	    $(foreach module,$(INTERNAL_MODULES),--privacy=HIDDEN:$(module)) -W -q shifter
	@echo "API documentation: apidocs/index.html"

# The man pages shifter(8) and shifter.toml(5) (docs/man/) and
# docs/reference.md, regenerated from the option definitions; commit them
# (tests/test_manpage.py fails when they differ from what this writes).
man: venv
	$(PY) -m shifter.admin.manpage docs

# Static types of shifter/, with the zope.interface plugin (mypy.ini).
typecheck: venv
	$(VENV)/bin/mypy

# The in-memory tests alone: seconds, no root.
unit: venv
	$(PY) -m twisted.trial --reactor=shifter tests.test_layout tests.test_connect tests.test_socks5 tests.test_socks_direct tests.test_tunnel tests.test_tunnel_table tests.test_sockopt tests.test_tap tests.test_passclient tests.test_holdsyn tests.test_directsyn tests.test_sniff tests.test_authority tests.test_destinations tests.test_logformat tests.test_pac \
	    tests.test_manpage tests.test_docs tests.test_reactor tests.test_metricspage

clean:
	rm -rf _trial_temp _trial_temp_kernel _trial_temp_debug test.log build *.egg-info
	$(MAKE) -C kernel_module clean 2>/dev/null || true
