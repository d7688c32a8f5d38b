from django.urls import path

from jobs import views

urlpatterns = [
    path("", views.enqueue, name="enqueue"),
    path("<str:job_id>/", views.status, name="job-status"),
]
