# Sourced by .ci/gpu_tests.sh and .ci/gpu_sanitize.sh (with repo set): copies tests/ out of
# the checkout and makes the package to test importable from /tmp, so that the installed
# package, not the source tree, is imported. The package is the cp312 wheel in .whl/ when
# there is one (installed into /tmp/site), else the jax_fp8gemm installed in this Python.
rm -rf /tmp/tests /tmp/site && cp -r "$repo/tests" /tmp/tests
cd /tmp || exit 1
if ls "$repo"/.whl/jax_fp8gemm-*cp312*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/site "$repo"/.whl/jax_fp8gemm-*cp312*.whl || exit 1
else
  echo "no wheel in .whl/: testing the jax_fp8gemm installed in this Python"
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
