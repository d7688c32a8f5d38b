"""Settings of the example site, all from the environment. No database: the job state lives in Redis.

- ``DJANGO_SECRET_KEY`` (required unless ``DJANGO_DEBUG=1``), ``DJANGO_DEBUG``, ``DJANGO_ALLOWED_HOSTS``.
- The queue: ``LLAVA_BROKER_URL``, ``LLAVA_RESULT_BACKEND``, ``LLAVA_DEFAULT_QUEUE``, ... (read by the
  producer itself), or the ``LLAVA`` dict below (``ClientSettings`` fields; wins over the environment).
"""

import os

DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or ("insecure-dev-key" if DEBUG else "")
ALLOWED_HOSTS = [h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",") if h]

INSTALLED_APPS = ["jobs"]
MIDDLEWARE = ["django.middleware.security.SecurityMiddleware", "django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "llava_site.urls"
WSGI_APPLICATION = "llava_site.wsgi.application"
DATABASES: dict = {}
USE_TZ = True

# Uploads up to this size stay in memory (larger ones go to a temporary file); the producer refuses images
# over its max_image_bytes (20 MiB by default) with 413 before reading them.
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

# Overrides of producer.ClientSettings (e.g. {"default_queue": "llava.mistral-7b"}); empty: environment.
LLAVA: dict = {}
