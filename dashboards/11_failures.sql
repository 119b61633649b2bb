-- Every current failure with its typed kind and message, newest attempt per item.
SELECT stage, error_kind, item_id, retryable, attempt, error_message, run_id, created_at
FROM current_failures
ORDER BY stage, error_kind, item_id
