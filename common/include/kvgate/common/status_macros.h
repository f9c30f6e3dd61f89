// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status and absl::StatusOr (Abseil 20220623 ships
// neither publicly).
//
//   RETURN_IF_ERROR(file.Open());
//   ASSIGN_OR_RETURN(auto tok, Tokenizer::FromFile(path));
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVGATE_CONCAT_INNER(a, b) a##b
#define KVGATE_CONCAT(a, b) KVGATE_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                                  \
  do {                                                         \
    ::absl::Status kvgate_status_ = (expr);                    \
    if (!kvgate_status_.ok()) return kvgate_status_;           \
  } while (0)

#define KVGATE_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(*tmp)

#define ASSIGN_OR_RETURN(lhs, expr) \
  KVGATE_ASSIGN_OR_RETURN_IMPL(KVGATE_CONCAT(kvgate_statusor_, __LINE__), lhs, expr)
