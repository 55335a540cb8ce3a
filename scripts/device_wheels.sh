# Sourced by the device scripts (device_moshi.sh, device_omni.sh): put the wheels carried in
# `.whl` (see their headers) on the Python path of the lent GPU machine, which has torch but
# not these; nothing there can be downloaded.
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
