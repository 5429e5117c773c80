from setuptools import find_packages, setup

setup(name='mmtwins', version='0.1.0', packages=find_packages(include=['mmtwins', 'mmtwins.*']))
