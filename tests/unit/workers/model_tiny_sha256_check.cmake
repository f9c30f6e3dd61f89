# cmake -DMODEL=<model.safetensors> -DGOLDEN=<golden.json> -P model_tiny_sha256_check.cmake
# Fails unless the generated file's SHA-256 equals the golden's safetensors_sha256 entry.
file(SHA256 "${MODEL}" actual)
file(READ "${GOLDEN}" golden_text)
string(JSON expected GET "${golden_text}" safetensors_sha256 model.safetensors)
if(NOT actual STREQUAL expected)
  message(FATAL_ERROR "${MODEL}: sha256 ${actual} differs from ${expected} recorded in ${GOLDEN}; "
                      "tools/make_tiny_model.py changed its output: regenerate the goldens with "
                      "tools/reference_forward.py --write-goldens tests/data/tiny_golden")
endif()
message(STATUS "sha256 ok: ${actual}")
