SELECT stage, error_kind, retryable, count(*) AS items, max(attempt) AS max_attempt,
       any_value(error_message) AS example
FROM current_failures
GROUP BY stage, error_kind, retryable
ORDER BY items DESC
