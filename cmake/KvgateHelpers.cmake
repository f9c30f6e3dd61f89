# Shared CMake helpers for kvgate targets.

# kvgate_warnings(TARGET): the project's warning set on one target.
function(kvgate_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter -Wno-sign-compare>)
endfunction()

# kvgate_test(NAME SOURCES src... LIBS lib... [LABELS l...] [TIMEOUT s] [ENV k=v...])
# One GoogleTest executable registered with ctest as a single test named NAME.
function(kvgate_test name)
  cmake_parse_arguments(T "" "TIMEOUT" "SOURCES;LIBS;LABELS;ENV" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  target_link_libraries(${name} PRIVATE ${T_LIBS} GTest::gtest GTest::gmock GTest::gtest_main)
  kvgate_warnings(${name})
  add_test(NAME ${name} COMMAND ${name})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  if(NOT T_LABELS)
    set(T_LABELS unit)
  endif()
  set_tests_properties(${name} PROPERTIES TIMEOUT ${T_TIMEOUT} LABELS "${T_LABELS}"
    ENVIRONMENT "KVGATE_SOURCE_DIR=${PROJECT_SOURCE_DIR};KVGATE_BINARY_DIR=${PROJECT_BINARY_DIR};${T_ENV}")
endfunction()

# kvgate_binary(TARGET): an installed-style executable, placed in <build>/bin.
function(kvgate_binary target)
  set_target_properties(${target} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)
  kvgate_warnings(${target})
endfunction()
