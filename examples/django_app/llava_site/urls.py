"""``/jobs/`` (POST: enqueue) and ``/jobs/<id>/`` (GET: state, result or error)."""

from django.urls import include, path

urlpatterns = [path("jobs/", include("jobs.urls"))]
