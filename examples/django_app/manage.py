#!/usr/bin/env python
"""Run the example site: ``python manage.py runserver`` (settings from the environment, see README)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llava_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
