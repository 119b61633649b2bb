SELECT family, model_name, model_origin, left(model_sha256, 16) AS weights_sha256,
       count(*) AS clips
FROM current_features
GROUP BY family, model_name, model_origin, model_sha256
ORDER BY family
