"""Downstream evaluation: does initialising from KNOW weights beat naive transfer?"""
