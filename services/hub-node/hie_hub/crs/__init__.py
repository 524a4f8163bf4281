"""``$generate-crs``: a care record summary generated on request from what consent lets flow."""
